// sparse_attention_decode_slots: the slot indices of a decode step, int32 idx [B, W + C] (one
// launch instead of a dozen array operations).  Row b, token position p = pos[b]:
//   column j < W: the window row of position q = p - (W - 1) + j, at slot ring_base + b W + q mod W,
//     -1 when q < 0;
//   column W + c, CSA (selected given, C = ksel): selected[b, c] + b rows, -1 where selected is -1;
//   column W + c, HCA (C = width): b rows + c while c < (p + 1) / ratio (the visible compressed
//     rows), else -1.
// One thread per entry, 256 per block.
#define DS4_SLOTS_THREADS 256

extern "C" __global__ void __launch_bounds__(DS4_SLOTS_THREADS)
sparse_attention_decode_slots(const long long* __restrict__ pos, int B, int W, long long ring_base, long long rows,
                              int ratio, const int* __restrict__ selected, int ksel, int width, int* __restrict__ idx) {
    const int cols = W + (selected != nullptr ? ksel : width);
    const long long t = (long long)blockIdx.x * DS4_SLOTS_THREADS + threadIdx.x;
    if (t >= (long long)B * cols) return;
    const int b = (int)(t / cols), j = (int)(t % cols);
    const long long p = pos[b];
    long long v = -1;
    if (j < W) {
        const long long q = p - (W - 1) + j;
        if (q >= 0) v = ring_base + (long long)b * W + q % W;
    } else if (selected != nullptr) {
        const int s = selected[(long long)b * ksel + (j - W)];
        if (s >= 0) v = (long long)b * rows + s;
    } else {
        const long long c = j - W;
        if (ratio > 0 && c < (p + 1) / ratio) v = (long long)b * rows + c;
    }
    idx[t] = (int)v;
}
