"""Hyperrouter routers inside HuggingFace transformers models, and sparse upcycling.

    from hyperrouter.integrations.transformers import replace_routers, set_top_k, upcycle

    replace_routers(model, "hyperrouter")       # every MoE block's router -> a hyperrouter router
    replace_routers(model, "smoe")              # the native gate copied: the same outputs
    with set_top_k(model, 1): model.generate(ids, max_new_tokens=8)
    upcycle(dense_model, num_experts=8, router="smoe", top_k=2)   # dense MLPs -> hyperrouter.MoE
    model.save_pretrained(path); model = load_pretrained(path)

MoE architectures (transformers >= 5): Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, GPT-OSS.
Dense MLPs for upcycling: Llama-style gated SiLU MLPs (Llama, Mistral, Qwen2, Qwen3) and GPT-2's.
The routers' auxiliary losses are added to `outputs.loss` when the model is called with labels
(and are on `outputs.hyperrouter_aux_losses`, `aux_losses(model)`); `trainer_callback()` runs the
routers' once-per-optimizer-step hooks in a transformers `Trainer`. transformers itself is
imported only when one of these functions runs (`bash scripts/setup.sh hf` installs it).
"""

from hyperrouter.integrations.transformers.checkpoint import load_pretrained
from hyperrouter.integrations.transformers.hosts import (
    HyperRouterModule,
    RouterAdapter,
    UpcycledMLP,
    aux_losses,
    optimizer_step,
    trainer_callback,
)
from hyperrouter.integrations.transformers.routers import (
    NATIVE_RULES,
    TopKChange,
    find_moe_blocks,
    replace_routers,
    set_top_k,
)
from hyperrouter.integrations.transformers.upcycle import upcycle

__all__ = [
    "NATIVE_RULES",
    "HyperRouterModule",
    "RouterAdapter",
    "TopKChange",
    "UpcycledMLP",
    "aux_losses",
    "find_moe_blocks",
    "load_pretrained",
    "optimizer_step",
    "replace_routers",
    "set_top_k",
    "trainer_callback",
    "upcycle",
]
