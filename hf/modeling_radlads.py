"""Hugging Face wrapper of a RADLADS student (remote code shipped by export.py; needs torch only).

The model itself is radlads_model.py, export.py's copy of the project's model.py (radlads_kernels.py
of kernels.py, radlads_teacher.py of the teacher.py modules it uses), so there is one implementation.
This file only adapts it: RadladsConfig carries StudentConfig as a dict under `student` (every field
written out, so nothing falls back to a default); RadladsForCausalLM wraps Student and passes its
recurrent State as the generation cache under the name `state`, the way transformers' own RWKV model
does: generate() feeds the prompt once, then one token per step with the carried state.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(folder)
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .radlads_model import State, Student, StudentConfig


class RadladsConfig(PretrainedConfig):
    model_type = "radlads"

    def __init__(self, student: dict | None = None, **kwargs):
        self.student = student          # StudentConfig.to_dict(), all fields
        super().__init__(**kwargs)

    def student_config(self) -> StudentConfig:
        missing = sorted({f.name for f in fields(StudentConfig)} - set(self.student or {}))
        if missing:
            raise ValueError(f"config.json: `student` lacks {missing}; re-export the checkpoint with export.py "
                             "(every StudentConfig field must be written so none falls back to a default)")
        return StudentConfig.from_dict(self.student)


@dataclass
class RadladsCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: State | None = None      # the recurrent cache after these tokens (ALL_CACHE_NAMES has "state")


class RadladsForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = RadladsConfig
    base_model_prefix = "model"
    _is_stateful = True             # no assisted decoding: a state cannot be rolled back
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}  # only with tie_word_embeddings

    def __init__(self, config: RadladsConfig):
        super().__init__(config)
        self.model = Student(config.student_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                # the cache is our State, created by the first forward

    def _init_weights(self, module):
        if isinstance(module, Student):       # the RoPE buffer is not in the checkpoint
            module.init_buffers()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids=None, attention_mask=None, state: State | None = None, labels=None,
                use_cache=None, return_dict=None, logits_to_keep: int = 0, **kwargs):
        """input_ids (B, T); `state` continues a sequence (T = 1 per step in generate()). The
        recurrence has no padding: a 0 in attention_mask (left padding) is an error."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("RADLADS students do not support padded batches (attention_mask has zeros): "
                             "generate each prompt separately or give prompts of equal length")
        h, state = self.model.hidden(input_ids, state)
        h = h[:, -logits_to_keep:] if logits_to_keep else h
        logits = self.model.lm_head(self.model.norm(h))
        loss = None
        if labels is not None:        # next-token cross-entropy, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return RadladsCausalLMOutput(loss=loss, logits=logits, state=state)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Carry `state` from one generate() step to the next, as transformers' RWKV model does:
        since transformers 5 generate() carries only a cache named `cache` by itself."""
        if outputs.get("state") is not None:
            model_kwargs["state"] = outputs.state
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
