"""Tensor parallelism: one model split across N processes that run every forward pass together.

    llm = LLM(tensor_parallel=2)        # starts rank 1 itself; `leapllm serve --tensor-parallel 2`

tensor_parallel.py splits a loaded Transformer into a rank's shard, communicator.py holds the
collectives, runtime.py starts the ranks and runs them (rank 0: TensorParallelModel; the others:
run_worker), worker.py is the entry point of a rank started by rank 0. See docs/scale-out.md.
"""

from leapllm.distributed.runtime import (
    RankSettings,
    TensorParallelError,
    TensorParallelModel,
    load_tensor_parallel,
    torchrun_rank,
)

__all__ = ["RankSettings", "TensorParallelError", "TensorParallelModel", "load_tensor_parallel", "torchrun_rank"]
