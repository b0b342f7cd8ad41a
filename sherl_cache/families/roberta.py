"""RoBERTa: BERT's layer maths under another class; its position ids (offset past the padding
index) are applied by the embeddings, so they are already inside the cached states."""

from __future__ import annotations

from transformers.models.roberta.modeling_roberta import RobertaLayer

from .bert import BertFamily


class RobertaFamily(BertFamily):
    name = "roberta"
    model_types = ("roberta",)
    layer_class = RobertaLayer
