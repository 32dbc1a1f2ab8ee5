"""open_clip's HFTextEncoder around a Hugging Face BERT/RoBERTa-style encoder (BiomedCLIP's
PubMedBERT text tower), stepped as its own forward runs it: the embeddings, the encoder's layers
under the padding mask the model itself builds, open_clip's pooler and projection.

The layers' arguments are the model's own (hf_layers.py: transformers 4.5x passes per-layer head
masks, None unless asked for; 5.x passes none), so the stepped tower computes exactly what the
encoder computes. Its attention is bidirectional: every token that is not padding counts
(`valid_mask`)."""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

from nearl.towers.base import Tower
from nearl.towers.hf_layers import call_layer, first_layer_inputs, spliced_embeddings

try:  # transformers is needed only for these towers
    from open_clip.hf_model import ClsPooler, HFTextEncoder
    from transformers.modeling_outputs import BaseModelOutput
except ImportError:  # pragma: no cover
    HFTextEncoder = ClsPooler = BaseModelOutput = None


class HFText(Tower):
    kind = "text"
    type_name = "open_clip HFTextEncoder around a BERT/RoBERTa-style encoder"
    takes_context = True

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.text = backbone.text
        self.model = self.text.transformer
        self._blocks = list(self.model.encoder.layer)
        self.pad_id = self.text.config.pad_token_id

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        text = getattr(backbone, "text", None)
        if HFTextEncoder is None or not isinstance(text, HFTextEncoder):
            return False
        model = text.transformer
        return hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")

    @classmethod
    def found(cls, backbone: nn.Module) -> str:
        text = getattr(backbone, "text", None)
        if HFTextEncoder is not None and isinstance(text, HFTextEncoder):
            return f"an HFTextEncoder around {type(text.transformer).__name__}, which has no BERT-style encoder.layer"
        return f"a text tower of type {type(text).__name__}" if text is not None else "no `text` tower"

    @property
    def width(self) -> int:
        return int(self.text.config.hidden_size)

    @property
    def blocks(self) -> List[nn.Module]:
        return self._blocks

    def padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The attention mask HFTextEncoder gives its model: 1 where the token is not padding."""
        return (tokens != self.pad_id).long()

    def stem(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        """(the embeddings, the first layer's other arguments, which `block` passes to every layer)."""
        return first_layer_inputs(lambda: self.model(input_ids=tokens, attention_mask=self.padding(tokens)),
                                  self._blocks[0])

    def context_stem(self, tokens: torch.Tensor, context: torch.Tensor, at: int = 1) -> Tuple[torch.Tensor, Any]:
        """The context replaces the word embeddings (before the position and type embeddings and the
        embeddings' LayerNorm, as a word would)."""
        with spliced_embeddings(self.model.embeddings.word_embeddings, context, at):
            return self.stem(tokens)

    def word_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings.word_embeddings(tokens)

    def block(self, k: int, x: torch.Tensor, attn_mask: Any = None) -> torch.Tensor:
        return call_layer(self._blocks[k], x, attn_mask)

    def check_adapted_blocks(self) -> None:
        for blk in self._blocks:
            if not (hasattr(blk, "attention") and hasattr(getattr(blk, "output", None), "dense")):
                raise ValueError(f"the text tower has {type(blk).__name__} layers; adapters go into BERT-style "
                                 "layers (attention, then output.dense) only")

    def adapted_block(self, k, x, attn_mask, after_attention, beside_mlp):
        """Post-norm (BERT): x1 = after_attention(LN1(x + attn(x))), then LN2(x1 + mlp(x1) +
        beside_mlp(x1)). The layer runs its own forward; hooks add the two terms where they go (its
        attention's output, and its output.dense before dropout and LN2), so any transformers
        version's layer signature works."""
        layer, seen = self._blocks[k], {}

        def on_attention(module, args, output):  # a tuple, or (some 5.x layer classes) the tensor
            seen["h"] = after_attention(output[0] if isinstance(output, tuple) else output)
            return (seen["h"], *output[1:]) if isinstance(output, tuple) else seen["h"]

        def on_dense(module, args, output):
            return output + beside_mlp(seen["h"])

        hooks = [layer.attention.register_forward_hook(on_attention), layer.output.dense.register_forward_hook(on_dense)]
        try:
            return self.block(k, x, attn_mask)
        finally:
            for hook in hooks:
                hook.remove()

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pooler = self.text.pooler
        if isinstance(pooler, ClsPooler) and pooler.use_pooler_output and getattr(self.model, "pooler", None) is not None:
            return self.model.pooler(x)  # what the model's own output carries as pooler_output
        return pooler(BaseModelOutput(last_hidden_state=x), self.padding(tokens))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text.proj(pooled)

    def valid_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens != self.pad_id

    def projection_parameters(self) -> List[nn.Parameter]:
        return list(self.text.proj.parameters())

    def output_dim(self) -> int:
        return int(self.text.output_dim)

    @property
    def context_length(self) -> int:
        return int(self.text.context_length)
