//! Which placeable worker hosts which model. Every worker computes the same answer from the
//! same snapshot, so no coordinator is needed: placements are taken in model order, and each
//! takes the eligible workers that rank highest for it (workers already hosting the model
//! first, so a new worker or a restart does not reshuffle running replicas; then by a hash
//! of model and worker id, which spreads models evenly).

use crate::schema::{ModelPhase, Snapshot};
use std::collections::BTreeMap;

/// FNV-1a, stable across builds and platforms (unlike std's hasher).
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What placement asks of one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub model: String,
    /// Rank, size and members of its tensor-parallel group, for placements of more than one
    /// worker per replica.
    pub group: Option<GroupAssignment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupAssignment {
    /// The same on every member: the model and a hash of the members.
    pub id: String,
    pub rank: usize,
    /// Worker ids in rank order; rank 0 leads.
    pub members: Vec<String>,
}

/// worker id → what it should host. A placement of `tensor_parallel` N takes its replicas as
/// groups of N workers, ranked in the order the workers rank for it, so that a group whose
/// members all still stand keeps its members and ranks.
pub fn assign(s: &Snapshot) -> BTreeMap<String, Assignment> {
    let mut out: BTreeMap<String, Assignment> = BTreeMap::new();
    for (model, p) in &s.placements {
        let mut eligible: Vec<(bool, u64, &str)> = s
            .workers
            .values()
            .filter(|w| w.placeable && !s.is_draining(&w.id) && !out.contains_key(&w.id) && p.admits(w))
            // A worker that failed to load this model leaves it to others.
            .filter(|w| !w.model.as_ref().is_some_and(|m| m.id == *model && m.phase == ModelPhase::Failed))
            .map(|w| {
                let hosting = w.model.as_ref().is_some_and(|m| m.id == *model);
                (!hosting, stable_hash(&[model.as_bytes(), w.id.as_bytes()]), w.id.as_str())
            })
            .collect();
        eligible.sort();
        let per_replica = p.tensor_parallel.max(1) as usize;
        let chosen: Vec<&str> = eligible.iter().map(|e| e.2).take(p.replicas as usize * per_replica).collect();
        // A group needs all its ranks: workers left over wait for more to join.
        for members in chosen.chunks_exact(per_replica) {
            let members: Vec<String> = members.iter().map(|m| m.to_string()).collect();
            let id = format!("{model}-{:08x}", stable_hash(&members.iter().map(|m| m.as_bytes()).collect::<Vec<_>>()) as u32);
            for (rank, w) in members.iter().enumerate() {
                let group = (per_replica > 1).then(|| GroupAssignment { id: id.clone(), rank, members: members.clone() });
                out.insert(w.clone(), Assignment { model: model.clone(), group });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::*;

    fn worker(id: &str, labels: &[(&str, &str)], model: Option<(&str, ModelPhase)>) -> WorkerRecord {
        WorkerRecord {
            schema: 1,
            id: id.into(),
            addr: format!("{id}:1"),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            placeable: true,
            model: model.map(|(m, phase)| ModelStatus { id: m.into(), phase, reason: None }),
            max_seqs: 16,
            load: LoadSummary::default(),
            tp_addr: None,
            group: None,
        }
    }

    fn models(a: &BTreeMap<String, Assignment>) -> BTreeMap<String, String> {
        a.iter().map(|(w, x)| (w.clone(), x.model.clone())).collect()
    }

    fn placement(model: &str, replicas: u32) -> Placement {
        Placement { schema: 1, model: model.into(), source: model.into(), replicas, workers: vec![], labels: BTreeMap::new(), tensor_parallel: 1 }
    }

    fn snapshot(workers: Vec<WorkerRecord>, placements: Vec<Placement>) -> Snapshot {
        Snapshot {
            workers: workers.into_iter().map(|w| (w.id.clone(), w)).collect(),
            placements: placements.into_iter().map(|p| (p.model.clone(), p)).collect(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn replicas_selectors_drains_and_failures_are_respected() {
        let ws = vec![worker("a", &[("zone", "x")], None), worker("b", &[], None), worker("c", &[("zone", "x")], None), worker("d", &[], None)];
        let mut s = snapshot(ws, vec![placement("m1", 2), placement("m2", 5)]);
        let a = models(&assign(&s));
        assert_eq!(a.values().filter(|m| *m == "m1").count(), 2);
        assert_eq!(a.values().filter(|m| *m == "m2").count(), 2, "the rest go to m2, one model per worker");

        let mut zoned = placement("m1", 5);
        zoned.labels.insert("zone".into(), "x".into());
        s.placements.insert("m1".into(), zoned);
        let a = models(&assign(&s));
        assert_eq!(a.get("a").map(String::as_str), Some("m1"));
        assert_eq!(a.get("c").map(String::as_str), Some("m1"));

        s.drains.insert("a".into());
        assert_ne!(models(&assign(&s)).get("a").map(String::as_str), Some("m1"), "drained workers get nothing");
        s.drains.clear();

        s.workers.insert("a".into(), worker("a", &[("zone", "x")], Some(("m1", ModelPhase::Failed))));
        assert_ne!(models(&assign(&s)).get("a").map(String::as_str), Some("m1"), "a failed load moves elsewhere");
    }

    #[test]
    fn replicas_stay_put_when_workers_join() {
        let mut s = snapshot(vec![worker("a", &[], None), worker("b", &[], None), worker("c", &[], None)], vec![placement("m", 1)]);
        let first = models(&assign(&s));
        let host = first.keys().next().unwrap().clone();
        s.workers.insert(host.clone(), worker(&host, &[], Some(("m", ModelPhase::Ready))));
        for id in ["d", "e", "f", "g"] {
            s.workers.insert(id.into(), worker(id, &[], None));
            assert_eq!(assign(&s).keys().next(), Some(&host));
        }
    }

    #[test]
    fn tensor_parallel_replicas_are_whole_groups_that_keep_their_ranks() {
        let mut p = placement("m", 2);
        p.tensor_parallel = 2;
        let ids = ["a", "b", "c", "d", "e"];
        let mut s = snapshot(ids.iter().map(|id| worker(id, &[], None)).collect(), vec![p]);
        let a = assign(&s);
        assert_eq!(a.len(), 4, "two groups of two; the fifth worker waits");
        let mut groups: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
        for (w, x) in &a {
            let g = x.group.as_ref().expect("a group assignment");
            assert_eq!(g.members[g.rank], *w, "a member's rank is its place in the member list");
            groups.entry(g.id.clone()).or_default().push((g.rank, w.clone()));
        }
        assert_eq!(groups.len(), 2);
        assert!(groups.values().all(|m| m.len() == 2));
        // Members that host the model keep their group when another worker joins.
        for w in a.keys() {
            s.workers.insert(w.clone(), worker(w, &[], Some(("m", ModelPhase::Ready))));
        }
        s.workers.insert("f".into(), worker("f", &[], None));
        let again = assign(&s);
        for (w, x) in &a {
            assert_eq!(again.get(w).and_then(|y| y.group.as_ref()).map(|g| g.id.clone()), x.group.as_ref().map(|g| g.id.clone()), "{w} changed group");
        }
        // Three workers cannot make two groups of two: one group, and one worker waiting.
        let mut p = placement("m", 2);
        p.tensor_parallel = 2;
        let s = snapshot(ids[..3].iter().map(|id| worker(id, &[], None)).collect(), vec![p]);
        assert_eq!(assign(&s).len(), 2);
    }
}
