"""How well a run used its model devices: the `efficiency` section of summary.json.

Every model actor (either engine) adds, after each call, what that call did to an
`EfficiencyBoard` (a zero-CPU actor on the driver's node): images encoded, seconds the model
was busy, and the actor's wall time since its model was ready. The vLLM engine adds its own
counters (prompt tokens, prefix-cache hits, ...). At the end the driver turns the totals and
the committed token count into:

    output_tokens_per_s             generated tokens in committed rows / run wall time
    per                             "GPU", or "model actor" when resources.gpus_per_actor is 0
    devices                         GPUs (actors x gpus_per_actor), or model actors
    images_per_s_per_device         images encoded / run wall time / devices
    output_tokens_per_s_per_device  output_tokens_per_s / devices
    busy_fraction                   model busy time / actor wall time, summed over the actors:
                                    transformers: time inside model calls (encode + generate,
                                    under the actor's model lock); vLLM: the engine's own busy
                                    time (at least one request in it). The actor's wall time
                                    runs from its model being ready to its last call's end.
    prefix_cache_hit_rate           vLLM: prompt tokens served from the prefix cache / prompt
                                    tokens; None (shown as n/a) for transformers
    roofline_fraction               output tokens/s per GPU / the decode bound of
                                    `resources.gpu_type` (ziya_model/roofline.py); None unless
                                    gpu_type is set and the actors have GPUs

Images are counted where they are encoded, so a batch Ray retried counts again; tokens come
from the committed rows, exactly once.
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

from pipeline.config import JobConfig
from pipeline.runtime.helpers import start_on_driver_node
from ziya_model.roofline import BYTES_PER_PARAM, decode_bound, llama_params

log = logging.getLogger("ziya_batch")

# How long an actor waits for the board to take its figures, and the driver for the totals.
# The board answers dictionary updates; waiting makes a call's figures arrive before its rows
# reach the driver, so the totals are complete when the last row is committed.
ADD_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0


class EfficiencyBoard:
    """Totals of every model actor of a run (a zero-CPU Ray actor on the driver's node)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def add(self, delta: dict[str, float]) -> None:
        for key, value in delta.items():
            self.totals[key] = self.totals.get(key, 0) + value

    def read(self) -> dict[str, float]:
        return dict(self.totals)

    @classmethod
    def start(cls):
        """On the driver's node (hard affinity), like the roster: a lost worker node cannot
        take the figures with it."""
        return start_on_driver_node(cls)


def send(board: Any, delta: dict[str, float]) -> None:
    """Add a call's figures to the board; never fails the call (a lost board loses figures)."""
    if board is None:
        return
    import ray

    try:
        ray.wait([board.add.remote(delta)], timeout=ADD_TIMEOUT_S)
    except Exception as err:  # the board's node is gone: the rows matter, the figures do not
        log.warning("efficiency figures not recorded: %s", err)


def read_totals(board: Any) -> dict[str, float] | None:
    """The board's totals, or None (with a warning) when it cannot be reached."""
    import ray

    try:
        return ray.get(board.read.remote(), timeout=READ_TIMEOUT_S)
    except Exception as err:
        log.warning("efficiency figures unavailable (board unreachable): %s", err)
        return None


def sequences_per_step(job: JobConfig) -> int:
    """The most sequences one decode step of the job's engine runs (the roofline's S)."""
    if job.model.engine == "vllm":
        return job.model.vllm.max_num_seqs
    from pipeline.stages.infer import MAX_AUTO_BATCH

    # InferStage cuts prompts into generate calls of at most batch_size (auto: at most 256).
    return (job.resources.batch_size or MAX_AUTO_BATCH) * job.generation.num_beams


def weight_bytes_per_param(job: JobConfig) -> int:
    """Bytes per LLM weight as the engine holds them on GPU."""
    if job.model.engine == "vllm" and job.model.vllm.quantization:
        return BYTES_PER_PARAM[job.model.vllm.quantization]
    dtype = job.model.dtype
    return BYTES_PER_PARAM["bf16" if dtype == "auto" else dtype]


def read_llm_config(job: JobConfig) -> dict:
    from pipeline.storage import filesystem

    fs, root = filesystem(job.model.llm, job.storage)
    return json.loads(fs.cat_file(posixpath.join(root, "config.json")))


def summarize(
    job: JobConfig,
    totals: dict[str, float] | None,
    tokens: int,
    wall_s: float,
    llm_config: dict | None = None,
) -> dict[str, Any]:
    """The `efficiency` section of summary.json (see the module docstring)."""
    t = totals or {}
    res = job.resources
    gpus = res.gpus_per_actor > 0
    devices = res.actors * res.gpus_per_actor if gpus else res.actors
    devices = int(devices) if float(devices).is_integer() else devices
    tokens_per_s = tokens / wall_s if wall_s > 0 else 0.0
    per_device = tokens_per_s / devices if devices else 0.0
    images = t.get("images")
    busy, actor_wall = t.get("busy_s"), t.get("actor_wall_s")
    prompt = t.get("prompt_tokens")
    out: dict[str, Any] = {
        "engine": job.model.engine,
        "output_tokens_per_s": round(tokens_per_s, 3),
        "per": "GPU" if gpus else "model actor",
        "devices": devices,
        "images_encoded": int(images) if images is not None else None,
        "images_per_s_per_device": round(images / wall_s / devices, 4)
        if images is not None and wall_s > 0 and devices
        else None,
        "output_tokens_per_s_per_device": round(per_device, 3),
        "busy_s": round(busy, 3) if busy is not None else None,
        "actor_wall_s": round(actor_wall, 3) if actor_wall is not None else None,
        "busy_fraction": round(min(busy / actor_wall, 1.0), 4)
        if busy is not None and actor_wall
        else None,
        "prefix_cache_hit_rate": round(t.get("cached_prompt_tokens", 0) / prompt, 4)
        if job.model.engine == "vllm" and prompt
        else None,
        "gpu_type": res.gpu_type,
        "decode_bound_tokens_per_s_per_gpu": None,
        "roofline_fraction": None,
    }
    if res.gpu_type and gpus:
        try:
            params = llama_params(llm_config if llm_config is not None else read_llm_config(job))
        except Exception as err:  # a config without LLaMA's keys: no bound, no failure
            log.warning("no decode roofline: cannot count the LLM's parameters: %s", err)
            return out
        bound = decode_bound(
            res.gpu_type, params, weight_bytes_per_param(job), sequences_per_step(job)
        )
        out["decode_bound_tokens_per_s_per_gpu"] = round(bound, 1)
        out["roofline_fraction"] = round(per_device / bound, 6)
        out["roofline_inputs"] = {
            "llm_params": params,
            "bytes_per_param": weight_bytes_per_param(job),
            "sequences_per_step": sequences_per_step(job),
        }
    return out


def rows(eff: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, value) lines for the printed summary and the HTML report."""
    if not eff:
        return []
    per = eff.get("per") or "GPU"

    def num(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    roof = "n/a (set resources.gpu_type)" if eff.get("gpu_type") is None else "n/a"
    if eff.get("roofline_fraction") is not None:
        roof = (
            f"{eff['roofline_fraction']:.4f} of {eff['decode_bound_tokens_per_s_per_gpu']:,.0f} "
            f"tokens/s ({eff['gpu_type']})"
        )
    return [
        ("engine", str(eff.get("engine"))),
        ("output tokens/s", num(eff.get("output_tokens_per_s"), "{:.1f}")),
        (f"images/s per {per}", num(eff.get("images_per_s_per_device"))),
        (f"output tokens/s per {per}", num(eff.get("output_tokens_per_s_per_device"), "{:.1f}")),
        ("engine busy fraction", num(eff.get("busy_fraction"), "{:.3f}")),
        ("prefix-cache hit rate", num(eff.get("prefix_cache_hit_rate"), "{:.3f}")),
        ("decode roofline fraction", roof),
    ]
