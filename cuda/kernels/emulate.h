// The subset of CUDA that attention.cu uses, on the host: every thread of a block is a host
// thread, `__syncthreads` a barrier between them, and blocks run one after another (so a
// block's shared memory is one buffer). Slow, and meant for tests: it runs the kernels'
// indexing, masking and reductions exactly as written, so a wrong slot, bound or barrier
// shows as a wrong value or an unwritten one (shared memory starts as NaN).
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

typedef _Float16 __half;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }

using std::max;
using std::min;

namespace emu {
// A barrier that sleeps rather than spins: a block's threads far outnumber the host's cores.
class Barrier {
   public:
    explicit Barrier(unsigned count) : count_(count) {}
    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned long generation = generation_;
        if (++arrived_ == count_) {
            arrived_ = 0;
            ++generation_;
            all_arrived_.notify_all();
        } else {
            all_arrived_.wait(lock, [&] { return generation_ != generation; });
        }
    }

   private:
    std::mutex mutex_;
    std::condition_variable all_arrived_;
    const unsigned count_;
    unsigned arrived_ = 0;
    unsigned long generation_ = 0;
};

inline thread_local dim3 thread_idx;
inline dim3 block_idx, block_dim, grid_dim;
inline Barrier* block_barrier = nullptr;
inline std::vector<float> shared_memory;

inline std::mutex launch_mutex;

// Runs `kernel` over `grid` blocks of `block` threads each, with `shared_bytes` of dynamic
// shared memory. One launch at a time: the block's state above is global, as a GPU's
// built-in variables are to its threads.
inline void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& kernel) {
    std::lock_guard<std::mutex> one_at_a_time(launch_mutex);
    grid_dim = grid;
    block_dim = block;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_idx = dim3{x, y, z};
                shared_memory.assign((shared_bytes + sizeof(float) - 1) / sizeof(float), NAN);
                Barrier barrier(threads);
                block_barrier = &barrier;
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([&, t] {
                        thread_idx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        kernel();
                    });
                for (auto& th : pool) th.join();
            }
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define KILN_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::shared_memory.data())

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
