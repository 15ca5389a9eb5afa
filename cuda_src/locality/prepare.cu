// locality_prepare<W> — the first of the locality recorder's two launches (locality_common.cuh).
//
// Per block of parts b, bmax[b][f] = the key of f's last access in it (-1 if none); per part q,
// pcum[q][f] = the rank f has right after the block's parts up to q if it is in them (the distinct
// experts whose last access there is later), else -1.  Thread layout: blocks of 256 threads, warp
// w reads part w's ids (kept in shared memory when they fit, and written out as int16 for the
// second kernel: -1 invalid) into its row of last keys; then, for a batch of prefixes at a time,
// prefix q's bitmap over the block's keys marks each expert's last key in parts 0 .. q (built word
// by word with ballots: a key that is its expert's last in its part and whose expert no later part
// up to q accesses), and a rank is the marks after the expert's key (suffix popcounts per word).
// First records of a run of one sequence snapshot that sequence's previous record (position, ids)
// before the second kernel overwrites it.  One extra block per layer ranks the experts by their
// last access before this call and carries `last` into the next call's buffer.
//
// Bytes per layer and step: the ids read once and written as int16 (2 bytes per slot), per part
// 4 E bytes of pcum and per block 4 E of bmax written.
#include "../common/common.cuh"
#include "locality_common.cuh"

#define DS4_LOC_PREP_U 4  // 32-slot steps of a part whose loads are in flight together

template <int W>
__global__ void __launch_bounds__(256, 4)
locality_prepare(const void* __restrict__ ids, int idx_kind, long long i_rs, long long i_cs, long long i_ls, long long T,
                 int k, int E, const void* __restrict__ seq, int seq64, long long num_seqs,
                 long long* __restrict__ prev_pos, int* __restrict__ prev_ids, long long* __restrict__ last,
                 int parity, int P, int NP, int NB, int* __restrict__ pcum, int* __restrict__ bmax,
                 int* __restrict__ rank, long long* __restrict__ snap_pos, int* __restrict__ snap_ids, int layer0,
                 int nbp, int stage, short* __restrict__ cids) {
    const long long li = blockIdx.y, layer = layer0 + li;
    const long long ioff = li * i_ls;  // ids of this layer
    const long long* last_cur;
    long long* last_next;
    ds4_to_layer(li, layer, E, k, NP, NB, T, num_seqs, last, parity, last_cur, last_next, pcum, bmax, rank,
                 snap_pos, snap_ids, prev_pos, prev_ids);
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
    if ((int)blockIdx.x == NB) {
        // the ranks by last access before this call (0 = most recent; accessed experts have
        // distinct times), and `last` carried into the next buffer
        __shared__ long long sl[512];
        for (int e = tid; e < 512; e += nt) {
            sl[e] = e < E ? last_cur[e] : -1;
            if (e < E) last_next[e] = sl[e];
        }
        __syncthreads();
        for (int e = tid; e < E; e += nt) {
            const long long le = sl[e];
            int n0 = 0, n1 = 0, n2 = 0, n3 = 0;  // independent sums: loads in flight
            for (int f = 0; f < E; f += 4) {
                n0 += sl[f] > le;
                n1 += sl[f + 1] > le;
                n2 += sl[f + 2] > le;
                n3 += sl[f + 3] > le;
            }
            rank[e] = n0 + n1 + n2 + n3;
        }
        return;
    }
    extern __shared__ __align__(16) unsigned char smem[];
    const int b = blockIdx.x, q0 = b * DS4_LOC_GP, nparts = min(DS4_LOC_GP, NP - q0);
    const long long r0 = (long long)q0 * P;
    const int nrec = (int)min((long long)nparts * P, T - r0);
    const int Pk = P * k, nkb = nrec * k;  // slots per part, slots of the block
    const int nwb = (int)(((long long)DS4_LOC_GP * Pk + 31) / 32);
    const int K0 = (int)(r0 * k);  // the block's first key
    // shared memory (the recorder's _prepare_smem mirrors it): per part last keys [GP][E], per
    // part the next part accessing each expert [GP][E] (bytes), the prefix bitmaps of one batch of
    // `nbp` prefixes over the block's keys [nbp][nwb] and their suffix counts [nbp][nwb], and with
    // `stage` the block's ids [GP P k] (int16, -1 invalid)
    int* s_last = reinterpret_cast<int*>(smem);  // [GP][E]
    unsigned char* s_np = smem + ds4_align16(4LL * DS4_LOC_GP * E);  // [GP][E]
    unsigned* s_bm = reinterpret_cast<unsigned*>(s_np + ds4_align16(1LL * DS4_LOC_GP * E));  // [nbp][nwb]
    int* s_sfx = reinterpret_cast<int*>(reinterpret_cast<unsigned char*>(s_bm) + ds4_align16(4LL * nbp * nwb));
    short* st = stage ? reinterpret_cast<short*>(reinterpret_cast<unsigned char*>(s_sfx) + ds4_align16(4LL * nbp * nwb))
                      : nullptr;
    for (int t = tid; t < DS4_LOC_GP * E / 4; t += nt)  // (GP E is a multiple of 4: 16-byte stores)
        reinterpret_cast<int4*>(s_last)[t] = make_int4(-1, -1, -1, -1);
    __syncthreads();
    if (warp < nparts) {  // warp w: its part's last keys, 32 slots a step, DS4_LOC_PREP_U steps' loads in flight
        const int rw = warp * P;  // the part's first record in the block
        const int nk = min(P, nrec - rw) * k, kb = rw * k;
        int* row = s_last + warp * E;
        const int di = 32 / k, dj = 32 - di * k;
        int ci = ds4_div(lane, k, 1.0f / (float)k), cj = lane - ci * k;  // the lane's record (in the part), slot
        const long long pbase = ioff + (r0 + rw) * i_rs;
        for (int base = lane; base < nk; base += 32 * DS4_LOC_PREP_U) {
            int e[DS4_LOC_PREP_U];
#pragma unroll
            for (int u = 0; u < DS4_LOC_PREP_U; ++u) {
                e[u] = base + 32 * u < nk ? ds4_load_expert(ids, idx_kind, pbase + ci * i_rs + cj * i_cs, E) : -1;
                ci += di;
                cj += dj;
                if (cj >= k) {
                    cj -= k;
                    ++ci;
                }
            }
#pragma unroll
            for (int u = 0; u < DS4_LOC_PREP_U; ++u) {
                if (e[u] >= 0) atomicMax(&row[e[u]], K0 + kb + base + 32 * u);
                if (base + 32 * u < nk) {
                    if (st != nullptr) st[kb + base + 32 * u] = (short)e[u];
                    cids[li * T * k + K0 + kb + base + 32 * u] = (short)e[u];  // for the second kernel
                }
            }
        }
    }
    for (int i = tid; i < nrec; i += nt) {  // snapshots for the first record of a run of several
        const long long r = r0 + i;
        const long long sq = ds4_seq_of(seq, seq64, r);
        if (sq < 0 || sq >= num_seqs) continue;
        const bool first = r == 0 || ds4_seq_of(seq, seq64, r - 1) != sq;
        const bool alone = r == T - 1 || ds4_seq_of(seq, seq64, r + 1) != sq;
        if (first && !alone) {
            snap_pos[r] = prev_pos[sq];
            for (int s = 0; s < k; ++s) snap_ids[r * k + s] = prev_ids[sq * k + s];
        }
    }
    __syncthreads();
    for (int f = tid; f < E; f += nt) {  // the block's last keys; per part the next part accessing f
        int m = -1, nxt = DS4_LOC_GP;
        for (int p = nparts - 1; p >= 0; --p) {
            const int key = s_last[p * E + f];
            s_np[p * E + f] = (unsigned char)nxt;
            if (key >= 0) nxt = p;
            m = max(m, key);
        }
        bmax[(long long)b * E + f] = m;
    }
    __syncthreads();
    // pcum, nbp prefixes at a time: prefix p's bitmap over the block's keys holds, for every expert
    // accessed in parts 0 .. p, its last key there (a key of part q <= p that is its expert's last
    // in q and whose expert no part in q + 1 .. p accesses: built by ballots, no atomics); a rank is
    // then the bits after the expert's key (suffix counts per word)
    const float rpk = 1.0f / (float)Pk;
    for (int p0 = 0; p0 + 1 < nparts; p0 += nbp) {  // block-uniform; the last part's ranks are not needed
        const int np = min(nbp, nparts - 1 - p0);
        const int nw = ((p0 + np) * Pk + 31) / 32;  // words holding the keys of parts 0 .. p0 + np - 1
        for (int w = warp; w < nw; w += DS4_LOC_GP) {
            const int x = 32 * w + lane;  // the block's key K0 + x
            unsigned iv = 0u;  // the prefixes p0 + jj marking this key: bit jj
            if (x < nkb) {
                // the key's id as written above (this block's own global writes: visible after the barrier)
                const int e = st != nullptr ? st[x] : cids[li * T * k + K0 + x];
                if (e >= 0) {
                    const int q = ds4_div(x, Pk, rpk);  // x / Pk (x < 2^18)
                    if (s_last[q * E + e] == K0 + x) {  // marked for the prefixes q .. (next part) - 1
                        const int ex = s_np[q * E + e];
                        iv = ((1u << ex) - 1u) & ~((1u << q) - 1u);
                        iv >>= p0;
                    }
                }
            }
            unsigned mine = 0u;  // lane jj keeps prefix p0 + jj's word
#pragma unroll
            for (int jj = 0; jj < DS4_LOC_GP - 1; ++jj) {
                const unsigned bits = __ballot_sync(0xffffffffu, (iv >> jj) & 1u);
                mine = lane == jj ? bits : mine;
            }
            if (lane < np) s_bm[lane * nwb + w] = mine;
        }
        __syncthreads();
        for (int jj = warp; jj < np; jj += DS4_LOC_GP)  // s_sfx[w] = the bits set in the words after w
            ds4_suffix_counts(s_bm + jj * nwb, nw, s_sfx + jj * nwb, lane, false);
        __syncthreads();
        for (int f = tid; f < E; f += nt) {  // f's rank after the parts through p
            int key = -1;
            for (int p = 0; p < p0; ++p) key = max(key, s_last[p * E + f]);
            for (int jj = 0; jj < np; ++jj) {
                key = max(key, s_last[(p0 + jj) * E + f]);
                int n = -1;
                if (key >= 0) {
                    const int x = key - K0;
                    n = s_sfx[jj * nwb + (x >> 5)] + __popc((s_bm[jj * nwb + (x >> 5)] >> (x & 31)) >> 1);
                }
                pcum[(long long)(q0 + p0 + jj) * E + f] = n;
            }
        }
        __syncthreads();
    }
}
