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

from clframe.strategies.prompt.base import PromptModule, PromptOutput, count_parameters
from clframe.strategies.prompt.baselines import LinearProbe, NearestClassMean
from clframe.strategies.prompt.coda_prompt import CODAPrompt
from clframe.strategies.prompt.dualprompt import DualPrompt
from clframe.strategies.prompt.l2p import L2P
from clframe.strategies.prompt.oneprompt import OVOR, OnePrompt
from clframe.strategies.prompt.ovor import VORConfig
from clframe.strategies.prompt.vit import PrefixAttention, PromptViT

__all__ = ["CODAPrompt", "DualPrompt", "L2P", "LinearProbe", "NearestClassMean", "OVOR", "OnePrompt", "PrefixAttention",
           "PromptModule", "PromptOutput", "PromptViT", "VORConfig", "count_parameters"]
