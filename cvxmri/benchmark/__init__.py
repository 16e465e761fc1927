"""Benchmarks of training memory and speed (`cvxmri benchmark memory|speed`).

- `workload`: one measured configuration, built as the trainer builds it, and its real step;
- `measure`: peak memory of a workload in a fresh process (CPU resident memory or the CUDA
  allocator);
- `memory`: memory against batch size and depth, largest batch within a budget;
- `speed`: throughput, training time, efficiency against the convolution peak;
- `plots`: the figures.
"""
