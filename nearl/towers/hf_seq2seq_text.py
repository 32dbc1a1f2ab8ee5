"""open_clip's HFTextEncoder around the encoder of a Hugging Face encoder-decoder model (open_clip's
`mt5-*` configs: an MT5 / T5 encoder stack; `nllb-clip-*`: an M2M100 encoder), stepped as the
encoder's own forward runs it, under the padding mask HFTextEncoder builds (`valid_mask`).

T5: no position embeddings; the first layer's attention computes a relative position bias that the
stack hands to every later layer. The stem runs the stack until that attention has returned and gives
every block, the first included, its inputs with that bias (the first computes the same bias when
given none, so the blocks compute what the stack does). Its layers are pre-norm (T5's RMS norm); the
stack ends with final_layer_norm and dropout, then open_clip's pooler. M2M100: scaled word
embeddings plus sinusoidal positions counted from the padding, pre-norm layers, a final layer_norm.

Both split their layers at the branches (`prenorm_parts`, for ALTA) and take CoOp's context in place
of word embeddings: at the start for T5 (its tokenizer adds no start token), after NLLB's language
code for M2M100, scaled as M2M100 scales its words."""
from __future__ import annotations

import inspect
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nearl.towers.base import PreNormParts, Tower
from nearl.towers.hf_layers import branch_output, first_layer_call, spliced_embeddings
from nearl.towers.hf_text import HFText

try:  # transformers is needed only for these towers
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder
    from transformers.models.mt5.modeling_mt5 import MT5Stack
    from transformers.models.t5.modeling_t5 import T5Stack
    T5_STACKS, M2M100_ENCODERS = (MT5Stack, T5Stack), (M2M100Encoder,)
except ImportError:  # pragma: no cover
    HFTextEncoder, T5_STACKS, M2M100_ENCODERS = None, (), ()


def _encoder_of(backbone: nn.Module, classes: Tuple[type, ...]):
    text = getattr(backbone, "text", None)
    if HFTextEncoder is None or not isinstance(text, HFTextEncoder):
        return None
    return text.transformer if isinstance(text.transformer, classes) else None


def with_argument(layer: nn.Module, layer_args: Any, name: str, value: Any) -> Any:
    """`layer_args` (args, kwargs) with `name` (a parameter of layer.forward) set to `value`, where the
    caller put it: positionally (as the stacks do) or by keyword."""
    args, kwargs = layer_args
    params = list(inspect.signature(layer.forward).parameters)[1:]  # after the hidden states
    if name in params[:len(args)]:
        i = params.index(name)
        return args[:i] + (value,) + args[i + 1:], kwargs
    return args, {**kwargs, name: value}


class _Seq2SeqText(HFText):
    """What the two share with HFText: the padding mask, open_clip's pooler and projection."""
    kind = "text"
    takes_context = True
    encoder_classes: Tuple[type, ...] = ()

    def __init__(self, backbone: nn.Module):
        Tower.__init__(self, backbone)
        self.text = backbone.text
        self.model = self.text.transformer
        self._blocks = list(self.layers(self.model))
        self.pad_id = self.text.config.pad_token_id

    @staticmethod
    def layers(model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        return HFTextEncoder is not None and _encoder_of(backbone, cls.encoder_classes) is not None

    @property
    def width(self) -> int:
        return int(self.text.config.d_model)

    # ALTA: the protocol's pre-norm split, not HFText's post-norm hooks
    check_adapted_blocks = Tower.check_adapted_blocks
    adapted_block = Tower.adapted_block


class HFT5Text(_Seq2SeqText):
    type_name = "open_clip HFTextEncoder around an MT5 / T5 encoder stack"
    context_at = 0  # T5's tokenizer adds no start token: "<text> </s>"
    encoder_classes = T5_STACKS

    @staticmethod
    def layers(model: nn.Module) -> nn.ModuleList:
        return model.block

    def stem(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        first = self._blocks[0]
        x, layer_args, attended = first_layer_call(
            lambda: self.model(input_ids=tokens, attention_mask=self.padding(tokens)), first, first.layer[0].SelfAttention)
        return x, with_argument(first, layer_args, "position_bias", attended[1])  # (output, position_bias, ...)

    def context_stem(self, tokens: torch.Tensor, context: torch.Tensor, at: int = 0) -> Tuple[torch.Tensor, Any]:
        with spliced_embeddings(self.model.embed_tokens, context, at):
            return self.stem(tokens)

    def word_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def prenorm_parts(self, k: int) -> PreNormParts:
        """x + dropout(attention(LN(x))), then x + dropout(DenseReluDense(LN(x))), as T5's layers add them."""
        block = self._blocks[k]
        self_attention, ff = block.layer[0], block.layer[-1]

        def attention(x: torch.Tensor, layer_args: Any) -> torch.Tensor:
            return self_attention.dropout(branch_output(block, self_attention.SelfAttention, x, layer_args))

        return PreNormParts(attention, ff.layer_norm, lambda h: ff.dropout(ff.DenseReluDense(h)))

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return super().pool(self.model.dropout(self.model.final_layer_norm(x)), tokens)

    @property
    def context_length(self) -> int:
        """T5 has no position table (HFTextEncoder says 0): open_clip's tokenizer default, as it pads."""
        return int(self.text.context_length) or DEFAULT_CONTEXT_LENGTH


class HFM2M100Text(_Seq2SeqText):
    type_name = "open_clip HFTextEncoder around an M2M100 (NLLB) encoder"
    context_at = 1  # after NLLB's language code
    encoder_classes = M2M100_ENCODERS

    @staticmethod
    def layers(model: nn.Module) -> nn.ModuleList:
        return model.layers

    def context_stem(self, tokens: torch.Tensor, context: torch.Tensor, at: int = 1) -> Tuple[torch.Tensor, Any]:
        embed = self.model.embed_tokens  # M2M100ScaledWordEmbedding: the context is scaled as a word is
        with spliced_embeddings(embed, context * embed.embed_scale, at):
            return self.stem(tokens)

    def word_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens.weight[tokens]  # before the scale, as context_stem takes the context

    def prenorm_parts(self, k: int) -> PreNormParts:
        layer = self._blocks[k]

        def dropout(h: torch.Tensor, p: float) -> torch.Tensor:
            return F.dropout(h, p=p, training=layer.training)

        def attention(x: torch.Tensor, layer_args: Any) -> torch.Tensor:
            return dropout(branch_output(layer, layer.self_attn, x, layer_args), layer.dropout)

        def mlp(h: torch.Tensor) -> torch.Tensor:
            h = dropout(layer.activation_fn(layer.fc1(h)), layer.activation_dropout)
            return dropout(layer.fc2(h), layer.dropout)

        return PreNormParts(attention, layer.final_layer_norm, mlp)

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return super().pool(self.model.layer_norm(x), tokens)
