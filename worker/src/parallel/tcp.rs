//! The CPU backend of `Collective`: the ranks of a group connected over TCP in a star around
//! rank 0. Rank 0 listens; the others connect to it, say who they are, and are let in when all
//! have come and agree on the group, its size and the model. Every collective goes through
//! rank 0, which sums (or collects) in rank order and sends the result back, so every rank
//! gets the same bits whatever the timing. Each message is a frame: one byte naming the
//! operation, eight bytes of length, the payload; an operation that does not match what the
//! receiver expects means the ranks are out of step and fails the group.
//!
//! Any rank that closes its connection or sends nothing within the timeout fails the
//! collective with its rank named, so a dead or hung rank is noticed at the next step.

use super::{Collective, CollectiveError};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const REDUCE: u8 = 1;
const GATHER: u8 = 2;
const BROADCAST: u8 = 3;
const BARRIER: u8 = 4;
/// Rank 0 asks a rank waiting for its next step whether it is still running.
const PING: u8 = 5;
const PONG: u8 = 6;
const HELLO: u8 = 10;
const WELCOME: u8 = 11;
const REFUSED: u8 = 12;

/// How long rank 0 waits for a ping's answer between steps: a rank that is stopped or stuck
/// fails the group after this, not at the next step's timeout.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest frame a rank accepts (a prefill step's all-reduce is rows x hidden values).
const MAX_FRAME: u64 = 1 << 32;

/// Who a rank is, as it tells rank 0 when it joins.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub rank: usize,
    pub size: usize,
    pub group: String,
    /// What the rank loads (file name, size and a digest of its header; see `model_identity`).
    pub model: String,
    pub layout: super::Layout,
}

/// How a rank joins its group.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub member: Member,
    /// Rank 0's address: where it listens (rank 0) or what the others connect to.
    pub leader: String,
    /// How long to wait for the group to form, and for any rank during a collective.
    pub timeout: Duration,
}

pub struct TcpGroup {
    rank: usize,
    size: usize,
    /// A second handle on a follower's connection to rank 0, to close it while the follower
    /// waits for a step (holding the links).
    closer: Option<TcpStream>,
    /// Held by rank 0 for a whole step, whose collectives each take `links` in turn.
    stepping: Mutex<()>,
    /// Rank 0: the connections to ranks 1.., in rank order. Others: the connection to rank 0.
    links: Mutex<Links>,
    timeout: Duration,
}

struct Links {
    streams: Vec<TcpStream>,
    scratch: Vec<u8>,
    spent: Duration,
    /// The first failure: after it the ranks are out of step for good, and every later
    /// collective fails at once with it.
    failed: Option<String>,
    /// When rank 0 last pinged the other ranks.
    last_ping: Instant,
}

fn group_err(what: impl Into<String>) -> CollectiveError {
    CollectiveError::Group(what.into())
}

fn peer_err(rank: usize, e: &std::io::Error, doing: &str) -> CollectiveError {
    let what = match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            format!("closed its connection while {doing} (the process exited or was killed)")
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!("sent nothing in time while {doing} (hung or overloaded)"),
        _ => format!("{e} while {doing}"),
    };
    CollectiveError::Peer { rank, what }
}

fn write_frame(stream: &mut TcpStream, op: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = op;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&head)?;
    stream.write_all(payload)
}

/// How long a rank polls for a frame before it sleeps in the kernel: inside a step the next
/// frame usually comes within tens of microseconds, sooner than a sleeping thread wakes.
const SPIN: Duration = Duration::from_micros(200);

/// Polls `stream` until it has something to read or `SPIN` has passed, yielding the core to
/// any thread that wants it (ranks sharing cores with other ranks stay fast).
fn spin_until_readable(stream: &TcpStream) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let start = Instant::now();
    let mut byte = [0u8; 1];
    while matches!(stream.peek(&mut byte), Err(ref e) if e.kind() == ErrorKind::WouldBlock) && start.elapsed() < SPIN {
        std::thread::yield_now();
    }
    let _ = stream.set_nonblocking(false);
}

/// Reads one frame into `out`, returning its operation.
fn read_frame(stream: &mut TcpStream, out: &mut Vec<u8>) -> std::io::Result<u8> {
    spin_until_readable(stream);
    let mut head = [0u8; 9];
    stream.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap_or_default());
    if len > MAX_FRAME {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("a frame of {len} bytes is more than any step sends")));
    }
    out.resize(len as usize, 0);
    stream.read_exact(out)?;
    Ok(head[0])
}

fn expect(rank: usize, op: u8, wanted: u8, doing: &str) -> Result<(), CollectiveError> {
    if op == wanted {
        Ok(())
    } else {
        Err(CollectiveError::Peer { rank, what: format!("is out of step: sent operation {op} while {doing}") })
    }
}

/// Sends `payload` as an `op` frame on every link; `first` is the rank at the far end of the
/// first link (1 on rank 0, whose links are ranks 1.., else 0).
fn send_all(streams: &mut [TcpStream], first: usize, op: u8, payload: &[u8], doing: &str) -> Result<(), CollectiveError> {
    for (i, s) in streams.iter_mut().enumerate() {
        write_frame(s, op, payload).map_err(|e| peer_err(first + i, &e, doing))?;
    }
    Ok(())
}

/// Reads one `op` frame from every link in rank order, handing each rank's payload to `take`.
fn recv_all(
    streams: &mut [TcpStream],
    first: usize,
    scratch: &mut Vec<u8>,
    op: u8,
    doing: &str,
    mut take: impl FnMut(usize, &[u8]) -> Result<(), CollectiveError>,
) -> Result<(), CollectiveError> {
    for (i, s) in streams.iter_mut().enumerate() {
        let got = read_frame(s, scratch).map_err(|e| peer_err(first + i, &e, doing))?;
        expect(first + i, got, op, doing)?;
        take(first + i, scratch)?;
    }
    Ok(())
}

fn to_bytes(values: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn from_bytes(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

impl TcpGroup {
    /// Forms the group: rank 0 waits for every other rank, checks that they agree with it, and
    /// lets them all in at once; other ranks connect (retrying while rank 0 is not up yet).
    pub fn join(spec: &GroupSpec) -> Result<TcpGroup, CollectiveError> {
        let m = &spec.member;
        if m.size == 0 || m.rank >= m.size {
            return Err(group_err(format!("rank {} is not in a group of {}", m.rank, m.size)));
        }
        let streams = if m.rank == 0 { Self::gather_members(spec)? } else { vec![Self::connect_to_leader(spec)?] };
        let closer = if m.rank == 0 { None } else { streams.first().and_then(|s| s.try_clone().ok()) };
        Ok(TcpGroup { rank: m.rank, size: m.size, closer, stepping: Mutex::new(()), links: Mutex::new(Links { streams, scratch: Vec::new(), spent: Duration::ZERO, failed: None, last_ping: Instant::now() }), timeout: spec.timeout })
    }

    fn gather_members(spec: &GroupSpec) -> Result<Vec<TcpStream>, CollectiveError> {
        let me = &spec.member;
        let listener = TcpListener::bind(&spec.leader).map_err(|e| group_err(format!("rank 0 cannot listen on {}: {e}", spec.leader)))?;
        listener.set_nonblocking(true).map_err(|e| group_err(e.to_string()))?;
        let deadline = Instant::now() + spec.timeout;
        let mut joined: Vec<Option<TcpStream>> = (0..me.size).map(|_| None).collect();
        let refuse_all = |joined: &mut Vec<Option<TcpStream>>, why: &str| {
            for s in joined.iter_mut().flatten() {
                let _ = write_frame(s, REFUSED, why.as_bytes());
            }
        };
        while joined.iter().skip(1).any(Option::is_none) {
            let (mut stream, addr) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (1..me.size).filter(|&r| joined[r].is_none()).map(|r| r.to_string()).collect();
                        let why = format!(
                            "rank {} of group `{}` did not join within {} s (rank 0 waits at {})",
                            missing.join(", rank "),
                            me.group,
                            spec.timeout.as_secs(),
                            spec.leader
                        );
                        refuse_all(&mut joined, &why);
                        return Err(group_err(why));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(group_err(format!("accepting a rank on {}: {e}", spec.leader))),
            };
            let _ = stream.set_nonblocking(false);
            if configure(&stream, spec.timeout.min(Duration::from_secs(10))).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            let hello = match read_frame(&mut stream, &mut buf) {
                Ok(HELLO) => serde_json::from_slice::<Member>(&buf).ok(),
                _ => None,
            };
            // Something that is not a rank (a port scanner, a health check): drop it.
            let Some(other) = hello else {
                tracing::warn!("tensor-parallel group `{}`: {addr} connected but did not introduce itself as a rank", me.group);
                continue;
            };
            let mismatch = if other.group != me.group {
                Some(format!("rank {} from {addr} belongs to group `{}`, not `{}`", other.rank, other.group, me.group))
            } else if other.size != me.size {
                Some(format!("rank {} from {addr} expects a group of {} ranks, rank 0 one of {}", other.rank, other.size, me.size))
            } else if other.rank == 0 || other.rank >= me.size {
                Some(format!("a rank from {addr} calls itself rank {} in a group of {}", other.rank, me.size))
            } else if joined[other.rank].is_some() {
                Some(format!("two processes claim rank {} (the second from {addr})", other.rank))
            } else if other.layout != me.layout {
                Some(format!("rank {} from {addr} splits the model in the {} layout, rank 0 in the {} layout", other.rank, other.layout.name(), me.layout.name()))
            } else if other.model != me.model {
                Some(format!("rank {} from {addr} loads a different model: {} (rank 0: {})", other.rank, other.model, me.model))
            } else {
                None
            };
            if let Some(why) = mismatch {
                let why = format!("group `{}`: {why}", me.group);
                let _ = write_frame(&mut stream, REFUSED, why.as_bytes());
                refuse_all(&mut joined, &why);
                return Err(group_err(why));
            }
            joined[other.rank] = Some(stream);
        }
        let mut streams: Vec<TcpStream> = joined.into_iter().skip(1).flatten().collect();
        for (i, s) in streams.iter_mut().enumerate() {
            configure(s, spec.timeout).and_then(|_| write_frame(s, WELCOME, &[])).map_err(|e| peer_err(i + 1, &e, "being let in"))?;
        }
        Ok(streams)
    }

    fn connect_to_leader(spec: &GroupSpec) -> Result<TcpStream, CollectiveError> {
        let deadline = Instant::now() + spec.timeout;
        let mut last = String::new();
        let mut stream = loop {
            let addrs: Vec<SocketAddr> = spec.leader.to_socket_addrs().map(|a| a.collect()).unwrap_or_default();
            if addrs.is_empty() {
                last = format!("{} does not resolve", spec.leader);
            }
            if let Some(s) = addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).map_err(|e| last = e.to_string()).ok()) {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(group_err(format!("rank {} cannot reach rank 0 at {} within {} s: {last}", spec.member.rank, spec.leader, spec.timeout.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // Rank 0 answers once every rank has joined, which may take up to the timeout.
        configure(&stream, spec.timeout + Duration::from_secs(5)).map_err(|e| group_err(e.to_string()))?;
        let hello = serde_json::to_vec(&spec.member).map_err(|e| group_err(e.to_string()))?;
        write_frame(&mut stream, HELLO, &hello).map_err(|e| peer_err(0, &e, "joining"))?;
        let mut buf = Vec::new();
        match read_frame(&mut stream, &mut buf).map_err(|e| peer_err(0, &e, "waiting to be let in"))? {
            WELCOME => {}
            REFUSED => return Err(group_err(format!("rank 0 refused rank {}: {}", spec.member.rank, String::from_utf8_lossy(&buf)))),
            op => return Err(CollectiveError::Peer { rank: 0, what: format!("answered a join with operation {op}") }),
        }
        configure(&stream, spec.timeout).map_err(|e| group_err(e.to_string()))?;
        Ok(stream)
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` on the links, counting its time.
    fn timed<T>(&self, op: impl FnOnce(&mut Links) -> Result<T, CollectiveError>) -> Result<T, CollectiveError> {
        let mut links = self.links();
        if let Some(why) = &links.failed {
            return Err(group_err(format!("failed earlier: {why}")));
        }
        let start = Instant::now();
        let out = op(&mut links);
        links.spent += start.elapsed();
        if let Err(e) = &out {
            links.failed = Some(e.to_string());
            // Closing every link tells the other ranks at once rather than at their timeout.
            for s in &links.streams {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        out
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.size == 1 {
            return Ok(());
        }
        let doing = "summing a layer's partial outputs";
        self.timed(|l| {
            let Links { streams, scratch, .. } = l;
            let expected = buf.len();
            let sized = |rank: usize, bytes: &[u8], what: &dyn Fn(usize) -> String| {
                if bytes.len() == expected * 4 {
                    Ok(())
                } else {
                    Err(CollectiveError::Peer { rank, what: what(bytes.len() / 4) })
                }
            };
            if self.rank == 0 {
                recv_all(streams, 1, scratch, REDUCE, doing, |rank, bytes| {
                    sized(rank, bytes, &|got| format!("sent {got} values to sum with {expected}"))?;
                    buf.iter_mut().zip(from_bytes(bytes)).for_each(|(a, b)| *a += b);
                    Ok(())
                })?;
                to_bytes(buf, scratch);
                send_all(streams, 1, REDUCE, scratch, doing)
            } else {
                to_bytes(buf, scratch);
                send_all(streams, 0, REDUCE, scratch, doing)?;
                recv_all(streams, 0, scratch, REDUCE, doing, |rank, bytes| {
                    sized(rank, bytes, &|got| format!("returned {got} summed values for {expected}"))?;
                    buf.iter_mut().zip(from_bytes(bytes)).for_each(|(a, b)| *a = b);
                    Ok(())
                })
            }
        })
    }

    fn gather(&self, local: &[f32]) -> Result<Option<Vec<Vec<f32>>>, CollectiveError> {
        if self.size == 1 {
            return Ok(Some(vec![local.to_vec()]));
        }
        let doing = "gathering logits";
        self.timed(|l| {
            let Links { streams, scratch, .. } = l;
            if self.rank == 0 {
                let mut parts = vec![local.to_vec()];
                recv_all(streams, 1, scratch, GATHER, doing, |_, bytes| {
                    parts.push(from_bytes(bytes).collect());
                    Ok(())
                })?;
                Ok(Some(parts))
            } else {
                to_bytes(local, scratch);
                send_all(streams, 0, GATHER, scratch, doing)?;
                Ok(None)
            }
        })
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, CollectiveError> {
        let gathered = self.gather(local)?;
        // Rank 0 sends every part's length, then the parts, as one broadcast.
        let mut bytes = Vec::new();
        if let Some(parts) = &gathered {
            bytes.extend_from_slice(&(parts.len() as u64).to_le_bytes());
            for p in parts {
                bytes.extend_from_slice(&(p.len() as u64).to_le_bytes());
            }
            for p in parts {
                p.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
            }
        }
        self.broadcast(&mut bytes)?;
        if let Some(parts) = gathered {
            return Ok(parts);
        }
        let bad = || CollectiveError::Peer { rank: 0, what: "sent a malformed all-gather".into() };
        let word = |i: usize| bytes.get(i * 8..i * 8 + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
        let n = word(0).ok_or_else(bad)?;
        if n != self.size {
            return Err(bad());
        }
        let mut at = (n + 1) * 8;
        let mut parts = Vec::with_capacity(n);
        for i in 0..n {
            let len = word(i + 1).ok_or_else(bad)?;
            let end = len.checked_mul(4).and_then(|b| b.checked_add(at)).filter(|&e| e <= bytes.len()).ok_or_else(bad)?;
            parts.push(from_bytes(&bytes[at..end]).collect());
            at = end;
        }
        Ok(parts)
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<(), CollectiveError> {
        if self.size == 1 {
            return Ok(());
        }
        let doing = "sending a step";
        self.timed(|l| {
            if self.rank == 0 {
                send_all(&mut l.streams, 1, BROADCAST, bytes, doing)?;
            } else {
                let op = read_frame(&mut l.streams[0], bytes).map_err(|e| peer_err(0, &e, doing))?;
                expect(0, op, BROADCAST, doing)?;
            }
            Ok(())
        })
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        if self.size == 1 {
            return Ok(());
        }
        let doing = "waiting at a barrier";
        self.timed(|l| {
            let Links { streams, scratch, .. } = l;
            if self.rank == 0 {
                recv_all(streams, 1, scratch, BARRIER, doing, |_, _| Ok(()))?;
                send_all(streams, 1, BARRIER, &[], doing)
            } else {
                send_all(streams, 0, BARRIER, &[], doing)?;
                recv_all(streams, 0, scratch, BARRIER, doing, |_, _| Ok(()))
            }
        })
    }

    fn next_broadcast(&self) -> Result<Option<Vec<u8>>, CollectiveError> {
        if self.rank == 0 {
            return Err(group_err("rank 0 sends steps; it does not wait for them"));
        }
        let mut links = self.links();
        let s = &mut links.streams[0];
        let mut op = [0u8; 1];
        loop {
            // Idle for as long as rank 0 has nothing to run; only the frame itself is timed.
            let _ = s.set_read_timeout(None);
            let first = s.read(&mut op);
            let _ = s.set_read_timeout(Some(self.timeout));
            match first {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => return Ok(None),
                Err(e) => return Err(peer_err(0, &e, "waiting for a step")),
            }
            if op[0] != PING {
                break;
            }
            let mut len = [0u8; 8];
            s.read_exact(&mut len).map_err(|e| peer_err(0, &e, "being pinged"))?;
            write_frame(s, PONG, &[]).map_err(|e| peer_err(0, &e, "answering a ping"))?;
        }
        expect(0, op[0], BROADCAST, "waiting for a step")?;
        let mut len = [0u8; 8];
        s.read_exact(&mut len).map_err(|e| peer_err(0, &e, "receiving a step"))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(CollectiveError::Peer { rank: 0, what: format!("sent a step of {len} bytes") });
        }
        let mut bytes = vec![0u8; len as usize];
        s.read_exact(&mut bytes).map_err(|e| peer_err(0, &e, "receiving a step"))?;
        Ok(Some(bytes))
    }

    fn seconds(&self) -> f64 {
        self.links().spent.as_secs_f64()
    }

    fn run_step(&self, step: &mut dyn FnMut() -> crate::Result<()>) -> crate::Result<()> {
        let _step = self.stepping.lock().unwrap_or_else(|e| e.into_inner());
        step()
    }

    fn check_alive(&self) -> Result<(), CollectiveError> {
        // A step in progress notices a dead rank itself; its frames must not be mistaken for
        // answers.
        let Ok(_between_steps) = self.stepping.try_lock() else { return Ok(()) };
        let Ok(mut links) = self.links.try_lock() else { return Ok(()) };
        if let Some(why) = &links.failed {
            return Err(group_err(format!("failed earlier: {why}")));
        }
        // Between steps nothing is in flight, so anything readable is an end of stream.
        let mut dead = None;
        for (i, s) in links.streams.iter().enumerate() {
            let rank = if self.rank == 0 { i + 1 } else { 0 };
            if s.set_nonblocking(true).is_err() {
                continue;
            }
            let mut byte = [0u8; 1];
            match s.peek(&mut byte) {
                Ok(0) => dead = Some(CollectiveError::Peer { rank, what: "closed its connection between steps (the process exited or was killed)".into() }),
                Err(e) if e.kind() != ErrorKind::WouldBlock => dead = Some(peer_err(rank, &e, "idle")),
                _ => {}
            }
            let _ = s.set_nonblocking(false);
            if dead.is_some() {
                break;
            }
        }
        // A rank can be there and not running (stopped, stuck): rank 0 asks each to answer.
        if dead.is_none() && self.rank == 0 && links.last_ping.elapsed() >= Duration::from_secs(1) {
            links.last_ping = Instant::now();
            let Links { streams, scratch, .. } = &mut *links;
            for (i, s) in streams.iter_mut().enumerate() {
                let _ = s.set_read_timeout(Some(PING_TIMEOUT));
                let answer = write_frame(s, PING, &[]).and_then(|()| read_frame(s, scratch));
                let _ = s.set_read_timeout(Some(self.timeout));
                match answer {
                    Ok(PONG) => {}
                    Ok(op) => dead = Some(CollectiveError::Peer { rank: i + 1, what: format!("answered a ping with operation {op}") }),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        dead = Some(CollectiveError::Peer { rank: i + 1, what: format!("did not answer within {} s between steps (stopped or stuck)", PING_TIMEOUT.as_secs()) })
                    }
                    Err(e) => dead = Some(peer_err(i + 1, &e, "being pinged")),
                }
                if dead.is_some() {
                    break;
                }
            }
        }
        match dead {
            Some(e) => {
                links.failed = Some(e.to_string());
                for s in &links.streams {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn close(&self) {
        // Not through the lock: a follower waiting for its next step holds it.
        if let Ok(links) = self.links.try_lock() {
            links.streams.iter().for_each(|s| drop(s.shutdown(std::net::Shutdown::Both)));
        } else if let Some(s) = &self.closer {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
