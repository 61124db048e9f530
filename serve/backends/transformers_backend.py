"""Any Hugging Face causal LM in-process: batched left-padded ``generate`` and ``score``.

For CPU machines and small GPU runs. Large models on GPU clusters use Ray Serve LLM
(``serve.backends.vllm_backend``) instead.
"""

from __future__ import annotations

import logging
from itertools import groupby

from serve.protocol import (
    BackendError,
    Completion,
    GenerationRequest,
    ScoreRequest,
    ScoreResult,
    TokenLogprobs,
)

logger = logging.getLogger(__name__)


class TransformersBackend:
    def __init__(self, model: str, *, device: str | None = None, torch_threads: int | None = None):
        self.model_id = model
        self._device = device
        self._torch_threads = torch_threads
        self._model = None
        self._tokenizer = None

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rl_system.models import resolve_model

        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        path = resolve_model(self.model_id)
        device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self._device = device
        self._max_positions = getattr(self._model.config, "max_position_embeddings", 2048)
        logger.info("loaded %s on %s", self.model_id, device)

    # -- helpers -----------------------------------------------------------------------

    def _render(self, request: GenerationRequest | ScoreRequest) -> str:
        if isinstance(request, GenerationRequest) and request.prompt is not None:
            return request.prompt
        messages = [m.model_dump() for m in request.messages]
        if self._tokenizer.chat_template:
            return self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        # Models without a chat template get a plain transcript.
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(turns) + "\n\nAssistant:"

    def _check_length(self, n_tokens: int, extra: int) -> None:
        if n_tokens + extra > self._max_positions:
            raise BackendError(
                f"prompt is {n_tokens} tokens + {extra} requested; "
                f"{self.model_id} accepts {self._max_positions}"
            )

    # -- protocol ------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Batch requests with equal sampling settings into one left-padded ``generate``."""
        results: dict[int, Completion] = {}
        indexed = sorted(enumerate(requests), key=lambda x: self._sampling_key(x[1]))
        for _, group in groupby(indexed, key=lambda x: self._sampling_key(x[1])):
            group = list(group)
            completions = self._generate_group([r for _, r in group])
            for (i, _), completion in zip(group, completions, strict=True):
                results[i] = completion
        return [results[i] for i in range(len(requests))]

    @staticmethod
    def _sampling_key(r: GenerationRequest) -> tuple:
        seeded = r.seed is not None and r.temperature > 0
        return (r.temperature, r.top_p, r.max_tokens, tuple(r.stop or ()), seeded)

    def _generate_group(self, requests: list[GenerationRequest]) -> list[Completion]:
        import torch

        tok, model = self._tokenizer, self._model
        first = requests[0]
        texts = [self._render(r) for r in requests]
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        self._check_length(batch["input_ids"].shape[1], first.max_tokens)
        batch = batch.to(self._device)
        sample = first.temperature > 0
        seeded = sample and first.seed is not None  # the whole group is (_sampling_key)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=first.max_tokens,
                # A seeded group samples through its own per-row generators (greedy on
                # Gumbel-perturbed scores), so transformers' sampler stays off.
                do_sample=sample and not seeded,
                temperature=first.temperature if sample and not seeded else None,
                top_p=first.top_p if sample and not seeded else None,
                top_k=None,
                logits_processor=_seeded_sampling(requests, self._device) if seeded else None,
                pad_token_id=tok.pad_token_id,
                stop_strings=first.stop or None,
                tokenizer=tok if first.stop else None,
            )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        eos_ids = set(_as_list(model.generation_config.eos_token_id)) | {tok.eos_token_id}
        completions = []
        for row, mask in zip(new_tokens, batch["attention_mask"], strict=True):
            ids = row.tolist()
            n = next((i for i, t in enumerate(ids) if t in eos_ids), None)
            finished = n is not None
            ids = ids[:n] if finished else ids
            text = tok.decode(ids, skip_special_tokens=True)
            for s in first.stop or ():
                if s in text:
                    text, finished = text.split(s, 1)[0], True
            completions.append(
                Completion(
                    text=text.strip(),
                    prompt_tokens=int(mask.sum()),
                    completion_tokens=len(ids),
                    finish_reason="stop" if finished else "length",
                    model=self.model_id,
                )
            )
        return completions

    def token_logprobs(self, texts: list[str]) -> list[TokenLogprobs]:
        """Log-probability of every token of each text given its prefix (one forward pass)."""
        import torch

        tok, model = self._tokenizer, self._model
        tok.padding_side = "right"  # positions then start at 0 for every row
        enc = tok(
            texts, return_tensors="pt", padding=True, add_special_tokens=False,
            return_offsets_mapping=True,
        )
        offsets = enc.pop("offset_mapping")
        self._check_length(enc["input_ids"].shape[1], 0)
        enc = enc.to(self._device)
        with torch.inference_mode():
            logits = model(**enc).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        ids = enc["input_ids"]
        token_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
        results = []
        for row in range(len(texts)):
            n = int(enc["attention_mask"][row].sum())
            row_ids = ids[row, :n].tolist()
            results.append(
                TokenLogprobs(
                    tokens=tok.convert_ids_to_tokens(row_ids),
                    logprobs=[None] + token_logp[row, : n - 1].tolist(),
                    text_offsets=[int(a) for a, _ in offsets[row, :n].tolist()],
                )
            )
        return results

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Sum of candidate-token log-probs after the rendered prompt, for every candidate.

        The prompt and each candidate are tokenised separately and concatenated, so the
        candidate's tokens are exactly those it would be generated as after the prompt.
        """
        import torch

        tok, model = self._tokenizer, self._model
        rows, spans, prompt_lens = [], [], []
        for req in requests:
            prompt_ids = tok(self._render(req), add_special_tokens=False)["input_ids"]
            prompt_lens.append(len(prompt_ids))
            for cand in req.candidates:
                cand_ids = tok(cand, add_special_tokens=False)["input_ids"]
                if not cand_ids:
                    raise BackendError("score: a candidate is empty")
                rows.append(prompt_ids + cand_ids)
                spans.append((len(prompt_ids), len(prompt_ids) + len(cand_ids)))
        width = max(len(r) for r in rows)
        self._check_length(width, 0)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
        with torch.inference_mode():
            logits = model(
                input_ids=input_ids.to(self._device), attention_mask=attention.to(self._device)
            ).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        sums = []
        for i, (start, end) in enumerate(spans):
            targets = input_ids[i, start:end]
            # token t is predicted by the logits at t-1
            sums.append(float(logp[i, start - 1 : end - 1].gather(-1, targets[:, None]).sum()))
        results, k = [], 0
        for req, plen in zip(requests, prompt_lens, strict=True):
            n = len(req.candidates)
            results.append(ScoreResult(logprobs=sums[k : k + n], prompt_tokens=plen))
            k += n
        return results

    def check_health(self) -> None:
        if self._model is None:
            raise BackendError(f"{self.model_id} is not loaded")


def _seeded_sampling(requests: list[GenerationRequest], device):
    """Sampling with one ``torch.Generator`` per request (``GenerationRequest.seed``).

    Temperature and top-p as transformers applies them, then the Gumbel-max trick: the
    arg-max of ``scores + Gumbel noise`` is a sample of ``softmax(scores)``. Each row draws
    its noise from its own generator, so a request's completion depends on its seed and
    not on which requests share its batch (up to the batch's padding arithmetic).
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    generators = [torch.Generator(device=device).manual_seed(int(r.seed)) for r in requests]

    class _Gumbel(LogitsProcessor):
        def __call__(self, input_ids, scores):
            u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                             for g in generators])
            tiny = torch.finfo(u.dtype).tiny
            return scores + (-torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))).to(scores.dtype)

    first = requests[0]
    warpers = [TemperatureLogitsWarper(first.temperature)]
    if first.top_p < 1.0:
        warpers.append(TopPLogitsWarper(first.top_p))
    return LogitsProcessorList([*warpers, _Gumbel()])


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
