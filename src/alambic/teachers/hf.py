"""A local HF causal LM as an in-process teacher (white box).

Generation runs in a worker thread so the event loop stays free; calls are serialised by a lock because
one model instance is not safe to run from several threads at once. For throughput at scale, serve the
model with `alambic serve` (dynamic batching) and use the `openai` backend instead.
"""

from __future__ import annotations

import asyncio
import threading

import torch

from .base import ChatRequest, Choice, Reply, Teacher, TeacherSpec


class LocalTeacher(Teacher):
    capability = "full_logits"

    def __init__(self, spec: TeacherSpec):
        super().__init__(spec)
        self.model = self.tokenizer = None
        self.lock = threading.Lock()

    async def start(self, api_keys: list[str | None] | None = None) -> None:
        from ..modeling import load

        if not self.spec.model:
            raise ValueError("the hf backend needs --model pointing at a model directory or .gguf file")
        self.model, self.tokenizer = await asyncio.to_thread(load, self.spec.model)

    async def complete(self, request: ChatRequest, api_key: str | None) -> Reply:
        return await asyncio.to_thread(self._complete, request)

    @torch.inference_mode()
    def _complete(self, request: ChatRequest) -> Reply:
        tok = self.tokenizer
        text = tok.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        sample = request.temperature > 0
        with self.lock:
            if request.seed is not None:
                torch.manual_seed(request.seed)
            out = self.model.generate(
                ids.repeat(request.n, 1),
                attention_mask=torch.ones_like(ids).repeat(request.n, 1),
                max_new_tokens=request.max_tokens,
                do_sample=sample,
                temperature=request.temperature if sample else None,
                top_p=request.top_p if sample else None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                output_scores=bool(request.top_logprobs),
                output_logits=bool(request.top_logprobs),
                return_dict_in_generate=True,
            )
        new = out.sequences[:, ids.shape[1]:]  # (n, T)
        choices, completion_tokens = [], 0
        for i in range(request.n):
            row = new[i].tolist()
            finish = "length"
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
                finish = "stop"
            completion_tokens += len(row) + (finish == "stop")
            lp = None
            if request.top_logprobs:
                lp = []
                for t, token_id in enumerate(row):
                    logp = torch.log_softmax(out.logits[t][i].float(), dim=-1)  # (V,) raw model distribution
                    top = torch.topk(logp, request.top_logprobs)
                    lp.append({"token": tok.decode([token_id]), "logprob": float(logp[token_id]),
                               "top": [[tok.decode([j]), float(v)] for v, j in zip(top.values.tolist(),
                                                                                   top.indices.tolist(), strict=True)]})
            choices.append(Choice(text=tok.decode(row, skip_special_tokens=True), finish_reason=finish, logprobs=lp))
        return Reply(choices=choices, prompt_tokens=ids.shape[1], completion_tokens=completion_tokens,
                     model=self.spec.model)
