"""Profiling: wall time per stage of prefill and decode, analytic FLOPs and bytes per stage, the
machine's measured limits, sweeps over prompt length and batch, and terminal/JSON/HTML reports.

    from leapllm import LLM
    from leapllm.profiling import profile_model, machine_limits, print_tables, write_html

    llm = LLM()
    data = profile_model(llm.model, llm.tokenizer, prompt_len=512, gen_len=128,
                         machine=machine_limits(llm.model.device))
    print_tables(data)
    write_html(data, "profile.html")
"""

from leapllm.profiling.costs import Cost, layer_costs, phase_costs, step_costs
from leapllm.profiling.machine import MachineLimits, machine_limits, measure_machine
from leapllm.profiling.profiler import profile_model, sweep_model
from leapllm.profiling.report import print_tables, render_html, to_json, write_html, write_json
from leapllm.profiling.stages import STAGES, StageHooks, StageRecorder

__all__ = [
    "Cost", "layer_costs", "phase_costs", "step_costs",
    "MachineLimits", "machine_limits", "measure_machine",
    "profile_model", "sweep_model",
    "print_tables", "render_html", "to_json", "write_html", "write_json",
    "STAGES", "StageHooks", "StageRecorder",
]
