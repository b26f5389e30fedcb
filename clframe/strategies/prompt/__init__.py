"""Prompt-based rehearsal-free class-incremental learning on a frozen timm ViT: L2P, DualPrompt, CODA-Prompt,
OnePrompt and OVOR (VOR on top of any of them with ``vor={...}``). See ``docs/methods/prompts.md``.

| strategy | prompts | query pass | forward passes per image |
|---|---|---|---|
| L2P | pool of M prompts + keys, top-N, prompt tuning at the input | yes | 2 |
| DualPrompt | G-prompt + one E-prompt per task (keys), prefix tuning | yes | 2 |
| CODA-Prompt | weighted sum of components (keys, attention vectors), prefix tuning | yes | 2 |
| OnePrompt / OVOR | one shared set of prefix prompts | no | 1 |
| LinearProbe (baseline) | none: frozen [CLS] + trained linear head | no | 1 |
| NearestClassMean (baseline) | none: frozen [CLS], nearest class mean, no training steps | no | 1 |
"""

from clframe.lazy import lazy_exports

__all__ = ["CODAPrompt", "DualPrompt", "L2P", "LinearProbe", "NearestClassMean", "OVOR", "OnePrompt", "PrefixAttention",
           "PromptModule", "PromptOutput", "PromptViT", "VORConfig", "count_parameters"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "clframe.strategies.prompt.base": ["PromptModule", "PromptOutput", "count_parameters"],
    "clframe.strategies.prompt.baselines": ["LinearProbe", "NearestClassMean"],
    "clframe.strategies.prompt.coda_prompt": ["CODAPrompt"],
    "clframe.strategies.prompt.dualprompt": ["DualPrompt"],
    "clframe.strategies.prompt.l2p": ["L2P"],
    "clframe.strategies.prompt.oneprompt": ["OVOR", "OnePrompt"],
    "clframe.strategies.prompt.ovor": ["VORConfig"],
    "clframe.strategies.prompt.vit": ["PrefixAttention", "PromptViT"],
})
