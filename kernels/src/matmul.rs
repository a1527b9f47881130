//! Matrix products `out[t, r] = dot(weight[r, :], x[t, :])` over quantized weights.
//!
//! Activations are first converted to the weight format's activation type (see
//! `DType::activation_type`), then rows are split across the thread pool. Several matrices
//! that read the same input (q/k/v, gate/up) run in one pool dispatch.

use crate::activation;
use crate::blocks::{cast_blocks_mut, BlockQ8K, BlockQ8_0, BlockQ8_1};
use crate::dot::{kernel_for_matrix, kernel_xn_for_matrix, ActScales, DotFn, DotManyFn};
use crate::dtype::DType;
use crate::packed::{BlockTable, PackedMatrix, GROUP, ZERO_POINTS};
use crate::packed_f32::PackedF32Fn;

/// `BlockTable::corrections` entries per Q8_0 block: eight lanes for each zero point.
const CORRECTIONS: usize = 8 * ZERO_POINTS.len();
use crate::pool::{split_range, SharedMut};
use crate::{Compute, KernelError};

/// A row-major `[rows, cols]` weight matrix viewed in place.
#[derive(Clone, Copy)]
pub struct WeightView<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl<'a> WeightView<'a> {
    /// Checks that `bytes` holds exactly `rows` rows of `cols` values of `dtype`.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: &'a [u8]) -> Result<Self, KernelError> {
        if !dtype.is_weight_type() {
            return Err(KernelError::Unsupported(format!("{dtype} cannot be a weight format")));
        }
        let row_bytes = dtype
            .row_bytes(cols)
            .ok_or_else(|| KernelError::Shape(format!("{cols} columns are not whole {dtype} blocks of {}", dtype.block_len())))?;
        if row_bytes.checked_mul(rows) != Some(bytes.len()) {
            return Err(KernelError::Shape(format!(
                "{rows}x{cols} {dtype} needs {} bytes, found {}",
                row_bytes.saturating_mul(rows),
                bytes.len()
            )));
        }
        if dtype != DType::F32 && !(bytes.as_ptr() as usize).is_multiple_of(2) {
            return Err(KernelError::Layout("weight data is not aligned for its format"));
        }
        Ok(WeightView { dtype, rows, cols, bytes })
    }

    pub fn row_bytes(&self) -> usize {
        self.bytes.len() / self.rows.max(1)
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.bytes[r * n..(r + 1) * n]
    }
}

/// A growable byte buffer aligned for every block type.
#[derive(Default)]
pub struct AlignedBuf {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes, in huge pages where the kernel allows (see `memory`): for the large
    /// buffers that are written once and then streamed through every step.
    pub fn zeroed_huge(len: usize) -> AlignedBuf {
        // `vec!` of zeros leaves fresh pages untouched until written, so the advice applies
        // to them from their first write.
        let mut buf = AlignedBuf { words: vec![0; len.div_ceil(8)], len };
        crate::memory::prefer_huge_pages(&mut buf.words);
        buf
    }

    pub fn resize(&mut self, len: usize) {
        let words = len.div_ceil(8);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
        self.len = len;
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u64 storage reinterpreted as bytes, within its length.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.len) }
    }
}

/// Input rows converted to one activation format; reused across steps to avoid allocation.
#[derive(Default)]
pub struct Activations {
    dtype: Option<DType>,
    cols: usize,
    num_rows: usize,
    row_bytes: usize,
    buf: AlignedBuf,
    /// Q8_0/Q8_1 block scales (and Q8_1 block sums) in single precision for the many-row
    /// kernels, four rows interleaved: `[row / 4][block][row % 4]`.
    scales: Vec<f32>,
    sums: Vec<f32>,
    /// Quants of row pairs side by side: `[row / 2][block][64]`.
    pairs: Vec<i8>,
    /// -128 x the sum of each 4-byte group of `pairs` (Q8_0 only): `[row / 2][block][16]`.
    pair_corr: Vec<i32>,
    /// Per-block scales and quant sums for the packed kernels (Q8_0 and Q8_1 rows, on CPUs
    /// that run them).
    blocks: BlockTable,
}

impl Activations {
    /// Converts `x` (`num_rows` rows of `cols` values) for multiplication with `weight_type`.
    pub fn prepare(&mut self, x: &[f32], num_rows: usize, cols: usize, weight_type: DType) -> Result<(), KernelError> {
        self.prepare_on(None, x, num_rows, cols, weight_type)
    }

    /// `prepare`, with the rows split across `compute`'s threads when given.
    pub fn prepare_on(&mut self, compute: Option<&Compute>, x: &[f32], num_rows: usize, cols: usize, weight_type: DType) -> Result<(), KernelError> {
        let at = weight_type.activation_type();
        let row_bytes = at
            .row_bytes(cols)
            .ok_or_else(|| KernelError::Shape(format!("{cols} columns are not whole {at} blocks")))?;
        if x.len() != num_rows * cols {
            return Err(KernelError::Shape(format!("input has {} values, expected {num_rows}x{cols}", x.len())));
        }
        let blocks = cols / 32;
        let (interleaved, pairs) = (num_rows.div_ceil(4) * 4 * blocks, num_rows.div_ceil(2) * blocks);
        // The side tables serve only the many-row kernels, which need four rows or more.
        let (tables, with_sums, with_corr) = match at {
            DType::Q8_0 if num_rows >= 4 => (true, false, true),
            DType::Q8_1 if num_rows >= 4 => (true, true, false),
            _ => (false, false, false),
        };
        self.buf.resize(row_bytes * num_rows);
        // Every entry a row owns is rewritten below, so stale contents need no clearing.
        self.scales.resize(if tables { interleaved } else { 0 }, 0.0);
        self.sums.resize(if with_sums { interleaved } else { 0 }, 0.0);
        self.pairs.resize(if tables { pairs * 64 } else { 0 }, 0);
        self.pair_corr.resize(if with_corr { pairs * 16 } else { 0 }, 0);
        // Only CPUs that run the packed kernels read these.
        let packed_rows = matches!(at, DType::Q8_0 | DType::Q8_1) && crate::Isa::detect().avx2();
        let per_block = if packed_rows { num_rows * blocks } else { 0 };
        self.blocks.d.resize(per_block, 0.0);
        self.blocks.corrections.resize(if at == DType::Q8_0 { per_block * CORRECTIONS } else { 0 }, 0);
        self.blocks.sums.resize(if at == DType::Q8_0 { per_block } else { 0 }, 0);
        self.blocks.s.resize(if at == DType::Q8_1 { per_block } else { 0 }, 0.0);
        self.dtype = Some(at);
        self.cols = cols;
        self.num_rows = num_rows;
        self.row_bytes = row_bytes;
        let out = RowTables {
            bytes: SharedMut::new(self.buf.bytes_mut()),
            scales: SharedMut::new(&mut self.scales),
            sums: SharedMut::new(&mut self.sums),
            pairs: SharedMut::new(&mut self.pairs),
            pair_corr: SharedMut::new(&mut self.pair_corr),
            block_d: SharedMut::new(&mut self.blocks.d),
            block_corrections: SharedMut::new(&mut self.blocks.corrections),
            block_sums: SharedMut::new(&mut self.blocks.sums),
            block_s: SharedMut::new(&mut self.blocks.s),
        };
        let fill = |rows: std::ops::Range<usize>| {
            for row in rows {
                // SAFETY: every row writes only the entries that belong to it.
                unsafe { out.fill(at, &x[row * cols..(row + 1) * cols], row, row_bytes, blocks, (tables, with_sums, with_corr, packed_rows)) };
            }
        };
        match compute {
            Some(c) if num_rows >= 8 => c.pool.for_ranges(num_rows, 4, &fill),
            _ => fill(0..num_rows),
        }
        Ok(())
    }

    /// Pre-converted scales of N rows starting at `t`, for the N-row kernels.
    /// `t` must be a multiple of 4.
    pub fn scales<const N: usize>(&self, t: usize) -> ActScales<N> {
        let blocks = self.cols / 32;
        let stride = 4 * blocks;
        let at = |v: &Vec<f32>| if v.is_empty() { std::ptr::null() } else { v[t / 4 * stride..].as_ptr() };
        let pairs = if self.pairs.is_empty() { std::ptr::null() } else { self.pairs[t / 2 * blocks * 64..].as_ptr() };
        let pair_corr = if self.pair_corr.is_empty() { std::ptr::null() } else { self.pair_corr[t / 2 * blocks * 16..].as_ptr() };
        ActScales { d: at(&self.scales), s: at(&self.sums), stride, pairs, pair_corr, blocks }
    }

    /// The rows as the packed kernels read them (Q8_0 and Q8_1 rows only).
    #[cfg(target_arch = "x86_64")]
    fn packed_view(&self) -> Option<crate::x86_packed::PackedActs<'_>> {
        let (block_bytes, quants_at) = match self.dtype? {
            DType::Q8_0 => (34, 2),
            DType::Q8_1 => (36, 4),
            DType::Q8K => (292, 0),
            _ => return None,
        };
        Some(crate::x86_packed::PackedActs {
            base: self.buf.bytes().as_ptr(),
            row_bytes: self.row_bytes,
            block_bytes,
            quants_at,
            blocks: self.cols / self.dtype?.block_len(),
            table: &self.blocks,
        })
    }

    /// Pointers to N rows starting at `t`.
    fn rows<const N: usize>(&self, t: usize) -> [*const u8; N] {
        std::array::from_fn(|k| self.row(t + k).as_ptr())
    }

    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    pub fn num_rows(&self) -> usize {
        self.num_rows
    }

    /// Row 0 of F32 rows (`cols` values apart), as the column-order kernels read them.
    fn f32_rows(&self) -> Option<*const f32> {
        (self.dtype == Some(DType::F32) && self.row_bytes == 4 * self.cols).then(|| self.buf.bytes().as_ptr() as *const f32)
    }

    pub fn row(&self, t: usize) -> &[u8] {
        &self.buf.bytes()[t * self.row_bytes..(t + 1) * self.row_bytes]
    }
}

/// Where one row's converted values and side-table entries go.
struct RowTables {
    bytes: SharedMut<u8>,
    scales: SharedMut<f32>,
    sums: SharedMut<f32>,
    pairs: SharedMut<i8>,
    pair_corr: SharedMut<i32>,
    block_d: SharedMut<f32>,
    block_corrections: SharedMut<i32>,
    block_sums: SharedMut<i32>,
    block_s: SharedMut<f32>,
}

impl RowTables {
    /// # Safety
    /// Rows filled concurrently must differ; the tables must be sized for the row.
    unsafe fn fill(&self, at: DType, src: &[f32], row: usize, row_bytes: usize, blocks: usize, (tables, with_sums, with_corr, packed_rows): (bool, bool, bool, bool)) {
        let dst = self.bytes.slice(row * row_bytes..(row + 1) * row_bytes);
        convert_row(at, src, dst);
        if packed_rows {
            let header = if at == DType::Q8_0 { 2 } else { 4 };
            let d = self.block_d.slice(row * blocks..(row + 1) * blocks);
            let (s, corr, sums) = match at {
                DType::Q8_1 => (self.block_s.slice(row * blocks..(row + 1) * blocks), &mut [][..], &mut [][..]),
                _ => (
                    &mut [][..],
                    self.block_corrections.slice(row * blocks * CORRECTIONS..(row + 1) * blocks * CORRECTIONS),
                    self.block_sums.slice(row * blocks..(row + 1) * blocks),
                ),
            };
            for (block, raw) in dst.chunks_exact(header + 32).enumerate() {
                d[block] = crate::blocks::f16_bits_to_f32(u16::from_le_bytes([raw[0], raw[1]]));
                if at == DType::Q8_1 {
                    s[block] = crate::blocks::f16_bits_to_f32(u16::from_le_bytes([raw[2], raw[3]]));
                    continue;
                }
                sums[block] = 0;
                for (lane, quads) in raw[header..].chunks_exact(4).enumerate() {
                    let sum = quads.iter().map(|&v| v as i8 as i32).sum::<i32>();
                    sums[block] += sum;
                    for (z, zp) in ZERO_POINTS.iter().enumerate() {
                        corr[(block * ZERO_POINTS.len() + z) * 8 + lane] = -zp * sum;
                    }
                }
            }
        }
        if !tables {
            return;
        }
        let place = |block: usize| (row / 4) * 4 * blocks + 4 * block + row % 4;
        let pair_at = |block: usize| ((row / 2) * blocks + block) * 64 + (row % 2) * 32;
        // Q8_0 and Q8_1 blocks both end in their 32 quants; only the header differs.
        let header = if at == DType::Q8_0 { 2 } else { 4 };
        let block_bytes = header + 32;
        for block in 0..blocks {
            let raw = &dst[block * block_bytes..(block + 1) * block_bytes];
            let d = u16::from_le_bytes([raw[0], raw[1]]);
            self.scales.slice(place(block)..place(block) + 1)[0] = crate::blocks::f16_bits_to_f32(d);
            if with_sums {
                let s = u16::from_le_bytes([raw[2], raw[3]]);
                self.sums.slice(place(block)..place(block) + 1)[0] = crate::blocks::f16_bits_to_f32(s);
            }
            let qs = &raw[header..];
            let at = pair_at(block);
            for (p, &q) in self.pairs.slice(at..at + 32).iter_mut().zip(qs) {
                *p = q as i8;
            }
            if with_corr {
                for (g, group) in qs.chunks_exact(4).enumerate() {
                    self.pair_corr.slice(at / 4 + g..at / 4 + g + 1)[0] = -128 * group.iter().map(|&v| v as i8 as i32).sum::<i32>();
                }
            }
        }
    }
}

fn convert_row(at: DType, src: &[f32], dst: &mut [u8]) {
    const WHY: &str = "activation buffers are allocated aligned and sized in whole blocks";
    match at {
        DType::F32 => {
            let dst = &mut dst[..4 * src.len()];
            if cfg!(target_endian = "little") {
                // SAFETY: `dst` is exactly as many bytes as `src` holds, and the two are
                // distinct buffers; f32s are their little-endian bytes on this target.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, dst.as_mut_ptr(), dst.len()) };
            } else {
                for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                    d.copy_from_slice(&s.to_le_bytes());
                }
            }
        }
        DType::F16 | DType::BF16 => {
            let convert = if at == DType::F16 { activation::convert_f16 } else { activation::convert_bf16 };
            let mut half = [0u16; 1];
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                convert(std::slice::from_ref(s), &mut half);
                d.copy_from_slice(&half[0].to_le_bytes());
            }
        }
        DType::Q8_0 => activation::quantize_q8_0(src, cast_blocks_mut::<BlockQ8_0>(dst).expect(WHY)),
        DType::Q8_1 => activation::quantize_q8_1(src, cast_blocks_mut::<BlockQ8_1>(dst).expect(WHY)),
        DType::Q8K => activation::quantize_q8k(src, cast_blocks_mut::<BlockQ8K>(dst).expect(WHY)),
        other => unreachable!("{other} is never an activation format"),
    }
}

/// One matrix of a grouped product and where its results go: `out` is `[num_rows, rows]`.
pub struct MatMulJob<'a, 'b> {
    pub weight: WeightView<'a>,
    /// The same matrix repacked (`packed`), used instead of `weight` where this CPU can.
    pub packed: Option<&'a PackedMatrix>,
    pub out: &'b mut [f32],
}

/// Rows of one weight matrix processed together so their bytes stay in L1 across inputs;
/// a whole packed group.
const ROW_TILE: usize = GROUP;
/// Input rows per block of the column-order F32 product: about a quarter of a core's L2.
const COLUMN_BLOCK_BYTES: usize = 128 << 10;

/// The packed kernel for `m` on `isa`, where there is one.
#[cfg(target_arch = "x86_64")]
fn packed_kernel(m: &PackedMatrix, isa: crate::Isa) -> Option<crate::x86_packed::PackedFn> {
    macro_rules! pick {
        ($k:ident) => {
            Some(match m.dtype {
                DType::Q4_0 => $k::q4_0,
                DType::Q4_1 => $k::q4_1,
                DType::Q5_0 => $k::q5_0,
                DType::Q5_1 => $k::q5_1,
                DType::Q8_0 => $k::q8_0,
                DType::Q2K => $k::q2k,
                DType::Q3K => $k::q3k,
                DType::Q4K => $k::q4k,
                DType::Q5K => $k::q5k,
                DType::Q6K => $k::q6k,
                _ => return None,
            })
        };
    }
    use crate::{x86_packed as vnni, x86_packed_avx2 as avx2};
    if isa.vnni() {
        pick!(vnni)
    } else if isa.avx2() {
        pick!(avx2)
    } else {
        None
    }
}

/// Multiplies every matrix in `jobs` with the same prepared activations, in one pool dispatch.
/// All weights must share the activation format `act` was prepared for.
pub fn matmul_group(compute: &Compute, act: &Activations, jobs: &mut [MatMulJob]) -> Result<(), KernelError> {
    let (pool, isa) = (&compute.pool, compute.isa);
    let num_rows = act.num_rows;
    struct Plan<'a> {
        weight: WeightView<'a>,
        dot: DotFn,
        /// Eight or four input rows per weight row at once, where the format has such
        /// kernels and its single-row kernel is the plain one (so results are identical).
        many8: Option<DotManyFn<8>>,
        many4: Option<DotManyFn<4>>,
        #[cfg(target_arch = "x86_64")]
        packed: Option<(&'a PackedMatrix, crate::x86_packed::PackedFn)>,
        /// An F32 matrix packed for the column-order product (`packed_f32`).
        columns: Option<(&'a PackedMatrix, PackedF32Fn)>,
        out: SharedMut<f32>,
        first_global_row: usize,
    }
    let mut plans = Vec::with_capacity(jobs.len());
    let mut total_rows = 0;
    for job in jobs.iter_mut() {
        let w = job.weight;
        if Some(w.dtype.activation_type()) != act.dtype || w.cols != act.cols {
            return Err(KernelError::Shape(format!(
                "weight {}x{} {} does not fit activations of {} columns in {:?}",
                w.rows, w.cols, w.dtype, act.cols, act.dtype
            )));
        }
        if let Some(p) = job.packed {
            if (p.dtype, p.rows, p.cols) != (w.dtype, w.rows, w.cols) {
                return Err(KernelError::Shape(format!(
                    "packed copy {}x{} {} does not match its weight {}x{} {}",
                    p.rows, p.cols, p.dtype, w.rows, w.cols, w.dtype
                )));
            }
        }
        if job.out.len() != num_rows * w.rows {
            return Err(KernelError::Shape(format!("output has {} values, expected {}x{}", job.out.len(), num_rows, w.rows)));
        }
        plans.push(Plan {
            weight: w,
            dot: kernel_for_matrix(w.dtype, w.rows, isa),
            many8: kernel_xn_for_matrix::<8>(w.dtype, w.rows, isa),
            many4: kernel_xn_for_matrix::<4>(w.dtype, w.rows, isa),
            #[cfg(target_arch = "x86_64")]
            packed: job.packed.and_then(|p| Some((p, packed_kernel(p, isa)?))),
            columns: job.packed.filter(|p| p.dtype == DType::F32).and_then(|p| Some((p, crate::packed_f32::kernel(isa)?))),
            out: SharedMut::new(job.out),
            first_global_row: total_rows,
        });
        total_rows += w.rows;
    }
    let n_threads = pool.num_threads();
    #[cfg(target_arch = "x86_64")]
    let packed_acts = act.packed_view();
    let work = |thread: usize| {
        let range = split_range(total_rows, ROW_TILE, n_threads, thread);
        for plan in &plans {
            let lo = range.start.max(plan.first_global_row);
            let hi = range.end.min(plan.first_global_row + plan.weight.rows);
            let rows = plan.weight.rows;
            let cols = plan.weight.cols;
            if let (Some((m, kernel)), Some(x)) = (plan.columns, act.f32_rows()) {
                if lo >= hi {
                    continue;
                }
                let (first, last) = ((lo - plan.first_global_row).div_ceil(GROUP), (hi - plan.first_global_row).div_ceil(GROUP));
                // Input rows in blocks of about 128 KiB, each against all of this thread's
                // groups: the block stays in cache while the groups stream past it (a batch
                // of encoder inputs is megabytes; read whole for every group, it would come
                // from memory each time). Every row's outputs are computed the same way
                // whatever its block, so the blocking does not change a bit.
                let block = ((COLUMN_BLOCK_BYTES / (4 * cols)) & !7).max(8);
                for t0 in (0..num_rows).step_by(block) {
                    let count = block.min(num_rows - t0);
                    // SAFETY: groups first..last hold 16 x cols values each (the packed copy
                    // matches the weight's shape), input rows t0..t0 + count were validated
                    // against cols, and this thread owns output columns 16 first..16 last.
                    unsafe { kernel(m.groups(first..last).as_ptr() as *const f32, last - first, cols, x.add(t0 * cols), count, plan.out.as_ptr().add(t0 * rows + first * GROUP), rows) };
                }
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if let (Some((m, kernel)), Some(acts)) = (plan.packed, packed_acts.as_ref()) {
                // A group belongs to the thread whose range holds its first row (ranges need
                // not start on a group boundary when an earlier matrix is not packed).
                if lo >= hi {
                    continue;
                }
                let (first, last) = ((lo - plan.first_global_row).div_ceil(GROUP), (hi - plan.first_global_row).div_ceil(GROUP));
                for g in first..last {
                    // SAFETY: the group and the activation rows were validated against the
                    // matrix's shape; this thread owns output columns 16g..16g + 16.
                    unsafe { kernel(m.group(g).as_ptr(), acts, 0, num_rows, plan.out.as_ptr().add(g * GROUP), rows) };
                }
                continue;
            }
            let mut r0 = lo;
            while r0 < hi {
                let r1 = (r0 + ROW_TILE).min(hi);
                let local = (r0 - plan.first_global_row)..(r1 - plan.first_global_row);
                let mut t = 0;
                if let Some(many) = plan.many8 {
                    while t + 8 <= num_rows {
                        run_many(many, &plan.weight, &plan.out, act, t, local.clone());
                        t += 8;
                    }
                }
                if let Some(many) = plan.many4 {
                    while t + 4 <= num_rows {
                        run_many(many, &plan.weight, &plan.out, act, t, local.clone());
                        t += 4;
                    }
                }
                for t in t..num_rows {
                    let a = act.row(t);
                    // SAFETY: each thread owns a disjoint range of rows of every output.
                    let out = unsafe { plan.out.slice(t * rows + local.start..t * rows + local.end) };
                    for (o, r) in out.iter_mut().zip(local.clone()) {
                        // SAFETY: row and activation lengths were validated against `cols` above.
                        *o = unsafe { (plan.dot)(plan.weight.row(r).as_ptr(), a.as_ptr(), cols) };
                    }
                }
                r0 = r1;
            }
        }
    };
    if total_rows <= ROW_TILE || n_threads == 1 {
        (0..n_threads).for_each(work);
    } else {
        pool.run(&work);
    }
    Ok(())
}

/// Rows `local` of `weight` against input rows `t..t + N`, written to `out` (`[inputs, rows]`).
fn run_many<const N: usize>(many: DotManyFn<N>, weight: &WeightView, out: &SharedMut<f32>, act: &Activations, t: usize, local: std::ops::Range<usize>) {
    let a = act.rows::<N>(t);
    let scales = act.scales::<N>(t);
    for r in local {
        let mut o = [0f32; N];
        // SAFETY: rows, activations and scales were validated against the weight's columns.
        unsafe { many(weight.row(r).as_ptr(), &a, &scales, weight.cols, &mut o) };
        for (k, v) in o.into_iter().enumerate() {
            // SAFETY: the calling thread owns row r of every output row.
            unsafe { out.slice((t + k) * weight.rows + r..(t + k) * weight.rows + r + 1)[0] = v };
        }
    }
}

/// `out = x · weightᵀ` for `num_rows` input rows; convenience for a single matrix.
pub fn matmul(compute: &Compute, weight: WeightView, x: &[f32], num_rows: usize, act: &mut Activations, out: &mut [f32]) -> Result<(), KernelError> {
    matmul_packed(compute, weight, None, x, num_rows, act, out)
}

/// `matmul`, with the weight's packed copy used where the CPU has a kernel for it.
pub fn matmul_packed(
    compute: &Compute,
    weight: WeightView,
    packed: Option<&PackedMatrix>,
    x: &[f32],
    num_rows: usize,
    act: &mut Activations,
    out: &mut [f32],
) -> Result<(), KernelError> {
    act.prepare_on(Some(compute), x, num_rows, weight.cols, weight.dtype)?;
    matmul_group(compute, act, &mut [MatMulJob { weight, packed, out }])
}
