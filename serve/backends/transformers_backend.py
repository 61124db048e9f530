"""Any Hugging Face causal LM in-process: batched left-padded ``generate`` and ``score``.

For CPU machines and small GPU runs. Large models on GPU clusters use Ray Serve LLM
(``serve.backends.vllm_backend``) instead.

Every batch method returns one result per request, in order; a request that cannot be
served as it stands (too long, an empty candidate) gets a non-transient ``BackendError``
in its place and the rest of the batch runs. Batches run concurrently in worker threads,
so nothing here mutates the shared tokenizer: padding is built per call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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

Cancelled = Callable[[], bool]  # true once every caller of the batch has gone


class TransformersBackend:
    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        torch_threads: int | None = None,
        max_prompt_tokens: int | None = None,
        dtype: str = "auto",
    ):
        self.model_id = model
        self.dtype = dtype
        self.max_prompt_tokens = max_prompt_tokens
        self._device = device
        self._torch_threads = torch_threads
        self._model = None
        self._tokenizer = None
        self._pad_id = 0

    @classmethod
    def config_kwargs(cls, role_cfg, serve_cfg) -> dict:
        """Constructor arguments from a role's config (plain data for ``LLMServerSpec``)."""
        return {
            "model": role_cfg.model,
            "torch_threads": serve_cfg.torch_threads or max(1, int(serve_cfg.num_cpus)),
            "max_prompt_tokens": role_cfg.max_prompt_tokens,
            "dtype": role_cfg.dtype,
        }

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from serve.devices import resolve_dtype, torch_dtype
        from serve.models import resolve_model

        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        path = resolve_model(self.model_id)
        device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(self.dtype, device)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._pad_id = (
            self._tokenizer.pad_token_id
            if self._tokenizer.pad_token_id is not None
            else self._tokenizer.eos_token_id
        )
        self._model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(self.dtype)
        ).to(device).eval()
        self._device = device
        self._max_positions = getattr(self._model.config, "max_position_embeddings", 2048)
        logger.info("loaded %s on %s in %s", self.model_id, device, self.dtype)

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

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def _length_error(self, n_prompt: int, new_tokens: int) -> BackendError | None:
        """The per-request limit: ``max_prompt_tokens`` if set, and the model's context."""
        if self.max_prompt_tokens is not None and n_prompt > self.max_prompt_tokens:
            return BackendError(
                f"prompt is {n_prompt} tokens; this server accepts at most "
                f"max_prompt_tokens {self.max_prompt_tokens}",
                transient=False,
            )
        if n_prompt + new_tokens > self._max_positions:
            return BackendError(
                f"prompt is {n_prompt} tokens + {new_tokens} requested; "
                f"{self.model_id} accepts {self._max_positions} in all",
                transient=False,
            )
        return None

    def _pad(self, rows: list[list[int]], *, side: str):
        """``input_ids`` and ``attention_mask`` padded on ``side``, built per call."""
        import torch

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            input_ids[i, span] = torch.tensor(r, dtype=torch.long)
            attention[i, span] = 1
        return input_ids.to(self._device), attention.to(self._device)

    # -- protocol ------------------------------------------------------------------------

    def generate(
        self, requests: list[GenerationRequest], *, cancelled: Cancelled | None = None
    ) -> list[Completion | BackendError]:
        """Requests with equal sampling settings share one left-padded ``generate``."""
        results: list = [None] * len(requests)
        ready = []
        for i, r in enumerate(requests):
            ids = self._encode(self._render(r))
            results[i] = self._length_error(len(ids), r.max_tokens)
            if results[i] is None:
                ready.append((i, r, ids))
        ready.sort(key=lambda x: self._sampling_key(x[1]))
        for _, group in groupby(ready, key=lambda x: self._sampling_key(x[1])):
            group = list(group)
            if cancelled is not None and cancelled():
                completions = [_gone() for _ in group]
            else:
                completions = self._generate_group(
                    [r for _, r, _ in group], [ids for _, _, ids in group], cancelled
                )
            for (i, _, _), completion in zip(group, completions, strict=True):
                results[i] = completion
        return results

    @staticmethod
    def _sampling_key(r: GenerationRequest) -> tuple:
        seeded = r.seed is not None and r.temperature > 0
        return (r.temperature, r.top_p, r.max_tokens, tuple(r.stop or ()), seeded)

    def _generate_group(
        self, requests: list[GenerationRequest], rows: list[list[int]],
        cancelled: Cancelled | None,
    ) -> list[Completion]:
        """``requests`` share their sampling settings (``_sampling_key``); ``rows`` are
        their prompt token ids."""
        import torch
        from transformers import StoppingCriteriaList

        tok, model = self._tokenizer, self._model
        first = requests[0]
        input_ids, attention = self._pad(rows, side="left")
        sample = first.temperature > 0
        stopping = StoppingCriteriaList([_StopWhen(cancelled)] if cancelled else [])
        seeded = sample and first.seed is not None  # the whole group is (_sampling_key)
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=first.max_tokens,
                # A seeded group samples through its own per-row generators (greedy on
                # Gumbel-perturbed scores), so transformers' sampler stays off.
                do_sample=sample and not seeded,
                temperature=first.temperature if sample and not seeded else None,
                top_p=first.top_p if sample and not seeded else None,
                top_k=None,
                logits_processor=_seeded_sampling(requests, self._device) if seeded else None,
                pad_token_id=self._pad_id,
                stop_strings=first.stop or None,
                tokenizer=tok if first.stop else None,
                stopping_criteria=stopping,
            )
        if cancelled is not None and cancelled():
            return [_gone() for _ in rows]
        new_tokens = out[:, input_ids.shape[1]:]
        eos_ids = set(_as_list(model.generation_config.eos_token_id)) | {tok.eos_token_id}
        completions = []
        for row, prompt in zip(new_tokens, rows, strict=True):
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
                    prompt_tokens=len(prompt),
                    completion_tokens=len(ids),
                    finish_reason="stop" if finished else "length",
                    model=self.model_id,
                )
            )
        return completions

    def _forward_logp(self, rows: list[list[int]]):
        """Log-softmax over a right-padded batch: every row's positions start at 0."""
        import torch

        input_ids, attention = self._pad(rows, side="right")
        with torch.inference_mode():
            logits = self._model(input_ids=input_ids, attention_mask=attention).logits.float()
        return torch.log_softmax(logits, dim=-1).cpu(), input_ids.cpu()

    def _span_logp(self, rows: list[list[int]], spans: list[tuple[int, int]]) -> list[float]:
        """Sum of each row's token log-probs over its ``(start, end)`` span, one forward
        pass; the vocabulary projection runs only at the positions that predict a span
        token (a few per row, not every prompt position)."""
        import torch

        input_ids, attention = self._pad(rows, side="right")
        # token t is predicted by the logits at t-1
        positions = sorted({p for start, end in spans for p in range(start - 1, end - 1)})
        column = {p: k for k, p in enumerate(positions)}
        with torch.inference_mode():
            logits = self._model(input_ids=input_ids, attention_mask=attention,
                                 logits_to_keep=torch.tensor(positions, device=self._device)
                                 ).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
        ids = input_ids.cpu()
        return [
            float(sum(logp[row, column[t - 1], ids[row, t]] for t in range(start, end)))
            for row, (start, end) in enumerate(spans)
        ]

    def token_logprobs(
        self, texts: list[str], *, cancelled: Cancelled | None = None
    ) -> list[TokenLogprobs | BackendError]:
        """Log-probability of every token of each text given its prefix (one forward pass)."""
        tok = self._tokenizer
        results: list = [None] * len(texts)
        ready = []
        for i, text in enumerate(texts):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            results[i] = self._length_error(len(ids), 0) or (
                BackendError("logprobs: the text is empty", transient=False) if not ids else None
            )
            if results[i] is None:
                ready.append((i, ids, enc["offset_mapping"]))
        if not ready:
            return results
        if cancelled is not None and cancelled():
            return [r or _gone() for r in results]
        logp, input_ids = self._forward_logp([ids for _, ids, _ in ready])
        for row, (i, ids, offsets) in enumerate(ready):
            n = len(ids)
            targets = input_ids[row, 1:n]
            token_logp = logp[row, : n - 1].gather(-1, targets[:, None]).squeeze(-1)
            results[i] = TokenLogprobs(
                tokens=tok.convert_ids_to_tokens(ids),
                logprobs=[None] + token_logp.tolist(),
                text_offsets=[int(a) for a, _ in offsets],
            )
        return results

    def score(
        self, requests: list[ScoreRequest], *, cancelled: Cancelled | None = None
    ) -> list[ScoreResult | BackendError]:
        """Sum of candidate-token log-probs after the rendered prompt, for every candidate.

        The prompt and each candidate are tokenised separately and concatenated, so the
        candidate's tokens are exactly those it would be generated as after the prompt.
        """
        results: list = [None] * len(requests)
        rows, spans, owners = [], [], []  # one row per candidate of a servable request
        for i, req in enumerate(requests):
            prompt_ids = self._encode(self._render(req))
            cands = [self._encode(c) for c in req.candidates]
            if not all(cands):
                results[i] = BackendError("score: a candidate is empty", transient=False)
                continue
            results[i] = self._length_error(len(prompt_ids), max(map(len, cands)))
            if results[i] is not None:
                continue
            for cand_ids in cands:
                rows.append(prompt_ids + cand_ids)
                spans.append((len(prompt_ids), len(prompt_ids) + len(cand_ids)))
                owners.append(i)
        if not rows:
            return results
        if cancelled is not None and cancelled():
            return [r or _gone() for r in results]
        sums: dict[int, list[float]] = {}
        for lp, i in zip(self._span_logp(rows, spans), owners, strict=True):
            sums.setdefault(i, []).append(lp)
        for i, values in sums.items():
            results[i] = ScoreResult(logprobs=values, prompt_tokens=spans[owners.index(i)][0])
        return results

    def check_health(self) -> None:
        """A one-token forward pass: a replica whose model no longer computes is unhealthy."""
        import torch

        if self._model is None:
            raise BackendError(f"{self.model_id} is not loaded")
        ids = torch.tensor([[self._pad_id]], device=self._device)
        with torch.inference_mode():
            logits = self._model(input_ids=ids).logits
        if not bool(torch.isfinite(logits).all()):
            raise BackendError(f"{self.model_id}: health check: the model's logits are not finite")


class _StopWhen:
    """Ends ``generate`` early once no caller waits for the batch any more."""

    def __init__(self, cancelled: Cancelled):
        self._cancelled = cancelled

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = bool(self._cancelled())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _gone() -> BackendError:
    return BackendError("cancelled: the caller stopped waiting", transient=True)


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
