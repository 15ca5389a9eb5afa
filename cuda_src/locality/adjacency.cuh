// Adjacency of consecutive records of one sequence, for locality_accumulate (accumulate.cu): the
// overlap of their expert sets, counted into the block's shared-memory bins.
#pragma once
#include "../common/common.cuh"
#include "locality_common.cuh"

// Adjacency of record r (lane's) with the previous record of its sequence, and the sequence's
// last record kept for the next call.  `cl` holds the layer's ids as the first kernel wrote them
// (int16, -1 invalid), `st` (if not null) a shared-memory copy of those of the records from r0
// on.  The previous record of a run's first record is the sequence's kept one: read here when the
// run is this one record (its thread alone reads and then writes it), else the snapshot prepare
// took.
__device__ __forceinline__ void ds4_adjacency(const short* cl, long long T, int k, int E, const void* pos, int pos64,
                                              long long pos_base, const void* seq, int seq64, long long num_seqs,
                                              const long long* snap_pos, const int* snap_ids, long long* prev_pos,
                                              int* prev_ids, unsigned* s_adj, long long r, const short* st,
                                              long long r0) {
    const long long sq = ds4_seq_of(seq, seq64, r);
    if (sq < 0 || sq >= num_seqs) return;
    const long long p = ds4_pos_of(pos, pos64, pos_base, r);
    const bool first = r == 0 || ds4_seq_of(seq, seq64, r - 1) != sq;
    const bool last_of_seq = r == T - 1 || ds4_seq_of(seq, seq64, r + 1) != sq;
    const bool direct = first && last_of_seq;
    const long long pp = direct ? prev_pos[sq] : first ? snap_pos[r] : ds4_pos_of(pos, pos64, pos_base, r - 1);
    auto id_of = [&](long long rr, int j) -> int {
        return st != nullptr && rr >= r0 ? (int)st[(rr - r0) * k + j] : (int)cl[rr * k + j];
    };
    auto B = [&](int j) -> int { return id_of(r, j); };
    if (pp == p - 1) {
        // A = the previous record's ids: kept, the snapshot, or the ids
        auto A = [&](int j) -> int {
            if (!first) return id_of(r - 1, j);
            const int a = direct ? prev_ids[sq * k + j] : snap_ids[r * k + j];
            return (a >= 0 && a < E) ? a : -1;
        };
        int inter = 0, na = 0, nb = 0, eq = 0;
        for (int j = 0; j < k; ++j) {
            const int a = A(j), b = B(j);
            if (a >= 0) {
                bool dup = false;
                for (int jj = 0; jj < j; ++jj) dup |= A(jj) == a;
                if (!dup) {
                    ++na;
                    bool in = false;
                    for (int jj = 0; jj < k; ++jj) in |= B(jj) == a;
                    inter += in;
                }
            }
            if (b >= 0) {
                bool dup = false;
                for (int jj = 0; jj < j; ++jj) dup |= B(jj) == b;
                nb += !dup;
            }
            eq += a >= 0 && a == b;
        }
        atomicAdd(&s_adj[0], 1u);
        atomicAdd(&s_adj[1], (unsigned)eq);
        atomicAdd(&s_adj[2 + inter * (2 * k + 1) + (na + nb - inter)], 1u);
    }
    if (last_of_seq) {
        prev_pos[sq] = p;
        for (int j = 0; j < k; ++j) prev_ids[sq * k + j] = B(j);
    }
}
