"""GPT-Neo attention through `torch.nn.functional.scaled_dot_product_attention`.

transformers ships GPT-Neo with an eager attention only: it upcasts q and k to fp32 and
materialises the T x T scores of every layer. `enable_sdpa` swaps that for SDPA while reproducing
the eager maths exactly:

- GPT-Neo does *not* scale the scores by 1/sqrt(head_dim), so SDPA gets `scale=1.0`;
- "local" layers see only the last `config.window_size` keys (the query included), "global"
  layers are plainly causal;
- padding (2D `attention_mask`), cache offsets during generation and document packing
  (`position_ids` restarting per document, no `attention_mask`) all come from transformers' own
  mask builder, as they do for the eager path.

The masks are built once per forward (one for global layers, one for local ones) by a mask
function registered with transformers under `IMPLEMENTATION`. The patch only changes the class of
the attention modules, so parameters, buffers and `state_dict` keys stay as they are.
"""

from typing import NamedTuple

import torch
from torch import nn
from transformers.masking_utils import (
    AttentionMaskInterface,
    and_masks,
    causal_mask_function,
    sdpa_mask,
    sliding_window_overlay,
)
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

# The name under which our mask builder is registered; patched models carry it in
# `config._attn_implementation` (transformers does not save that field with the config).
IMPLEMENTATION = "gpt_neo_sdpa"


class NeoMasks(NamedTuple):
    """Boolean masks (True = attend) shared by all layers of one forward.

    A mask is None when SDPA's own causal masking is exact (no padding, no packing, window not
    reached); the layer then passes `is_causal` instead, which lets SDPA pick its fastest kernel.
    """

    full: torch.Tensor | None
    local: torch.Tensor | None


def gpt_neo_sdpa_masks(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    config=None,
    **kwargs,
) -> NeoMasks:
    """The masks `create_causal_mask` builds for patched models (an `AttentionMaskInterface` entry).

    `mask_function` already encodes causality, padding and packing; the local mask adds the
    window on top, as the eager layer does with its `bias` buffer.
    """
    common = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )
    full = sdpa_mask(mask_function=mask_function, **common)
    window = sliding_window_overlay(config.window_size)
    local = sdpa_mask(
        mask_function=and_masks(mask_function, window), local_size=config.window_size, **common
    )
    return NeoMasks(full=full, local=local)


class GPTNeoSdpaSelfAttention(GPTNeoSelfAttention):
    """`GPTNeoSelfAttention` with the same weights, computed by SDPA.

    Attention weights are never materialised, so the second output is always None (as with
    transformers' own SDPA models).
    """

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        layer_past=None,
        use_cache=False,
        output_attentions=False,
        **kwargs,
    ):
        if not isinstance(attention_mask, NeoMasks):
            # Not built by our mask function (a custom 4D mask, or the config was switched
            # back): only the eager path knows what the caller meant.
            return super().forward(
                hidden_states, attention_mask, layer_past, use_cache, output_attentions, **kwargs
            )

        query = self._split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
        key = self._split_heads(self.k_proj(hidden_states), self.num_heads, self.head_dim)
        value = self._split_heads(self.v_proj(hidden_states), self.num_heads, self.head_dim)
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_id)

        mask = attention_mask.local if self.attention_type == "local" else attention_mask.full
        # Without a mask a single query attends to the whole cache; several queries are causal.
        # SDPA aligns `is_causal` top-left, which is right here: the mask builder only drops the
        # mask when the queries start at position 0 or cover all keys.
        is_causal = mask is None and query.shape[2] > 1
        attn_output = nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=self.attn_dropout.p if self.training else 0.0,
            is_causal=is_causal,
            scale=1.0,  # GPT-Neo was trained without the 1/sqrt(head_dim) factor
        )

        attn_output = self._merge_heads(attn_output, self.num_heads, self.head_dim)
        attn_output = self.resid_dropout(self.out_proj(attn_output))
        return attn_output, None


def enable_sdpa(model: nn.Module) -> int:
    """Switch every eager GPT-Neo attention in `model` (PEFT-wrapped or not) to SDPA, in place.

    Returns the number of layers patched: 0 for a model that is not GPT-Neo, that uses
    flash-attention already, or that was patched before.
    """
    AttentionMaskInterface.register(IMPLEMENTATION, gpt_neo_sdpa_masks)
    patched = 0
    for module in model.modules():
        # An exact type check: subclasses (flash-attention) have their own forward and masks.
        if type(module) is GPTNeoSelfAttention:
            module.__class__ = GPTNeoSdpaSelfAttention
            # The config is shared with GPTNeoModel, whose forward asks transformers for masks
            # of this implementation; the eager layers ignore it once swapped.
            module.config._attn_implementation = IMPLEMENTATION
            patched += 1
    return patched
