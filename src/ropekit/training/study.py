"""`ropekit study`: train short, extend, fine-tune long — the evidence, end to end, on a CPU.

1. Pretrain a small Llama-style ``transformers`` model (built from a config, random init) at a short length
   L on real text: the Python standard library's sources, as UTF-8 bytes. Byte tokens (vocab 257) keep the
   embedding and softmax from dominating a CPU run, need no tokenizer training and are lossless; the
   price is fewer characters per context than a subword tokenizer gives.
   A share of the pretraining rows are synthetic passkey prompts (the standard filler, "The pass key is
   K. Remember it. K is the pass key.", then "What is the pass key? The pass key is K") so the small model
   learns retrieval at length L; the evaluation asks for keys in longer prompts.
2. Evaluate every method (no scaling, linear/PI, NTK, dynamic NTK, YaRN; scale s = factor) at L, 2L, 4L and
   8L: perplexity per length and per position bucket on held-out files, passkey accuracy.
3. Fine-tune a copy of the pretrained model with each method for the same number of steps at the long
   length (factor * L), on the same mixture, and evaluate again.
4. PoSE (``pose_window`` > 0): fine-tune YaRN (or the last method given) once more for the same steps, now on
   ``pose_window``-byte windows whose position ids are spread over factor * L (``ropekit.training.pose``), and
   set it beside the full-length run: training time, activation memory kept for backward, and the evaluation.
5. Write the report folder: summary.md, results.json, ppl_vs_position.png, training_curves.png.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ropekit.config import RopeConfig
from ropekit.evaluation.passkey import FILLER, KEY_SENTENCE, QUESTION, answer_ids, passkey_prompt
from ropekit.training.data import ByteTokenizer, PackedRows, pack_documents, tokenize_documents
from ropekit.training.finetune import FinetuneSettings, train

STUDY_METHODS = ("default", "linear", "ntk", "dynamic", "yarn", "longrope")
METHOD_LABELS = {"default": "no scaling", "linear": "linear (PI)", "ntk": "NTK", "dynamic": "dynamic NTK",
                 "yarn": "YaRN", "longrope": "LongRoPE (searched)"}
KEY_DIGITS = 5
BYTES = ByteTokenizer()
# Passkey rows and prompts are ropekit.evaluation.passkey's prompt without its instruction (a model trained on
# 256 bytes has no room for it), followed by the answer " 12345" (1 + KEY_DIGITS bytes; all of it ASCII).
ANSWER_LEN = 1 + KEY_DIGITS
MIN_PROMPT = len(FILLER) + len(KEY_SENTENCE.format(key="0" * KEY_DIGITS)) + len(QUESTION) + ANSWER_LEN


@dataclass(frozen=True)
class StudySizes:
    """Every size of the study (the CLI exposes each as an option)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    rope_base: float = 10000.0
    train_len: int = 256
    factor: int = 8
    pretrain_steps: int = 500
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    finetune_steps: int = 30
    finetune_batch: int = 2
    finetune_lr: float = 3e-4
    finetune_warmup: int = 5
    passkey_share: float = 0.2
    eval_windows: int = 6
    passkey_samples: int = 16
    max_files: int = 600
    seed: int = 0
    pose_window: int = 256  # PoSE run's window in bytes (0: no PoSE run)
    search_budget: int = 256  # forwards of the LongRoPE factor search (method "longrope"); ~20 s here
    search_population: int = 32
    search_needles: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "train_len", "factor",
                     "pretrain_steps", "pretrain_batch", "finetune_steps", "finetune_batch", "eval_windows",
                     "passkey_samples", "max_files", "search_population", "search_needles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        for name in ("pretrain_lr", "finetune_lr"):  # checked here, not when the training of that phase starts
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden: must split into {self.heads} heads of an even size, got {self.hidden}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: must divide heads ({self.heads}), got {self.kv_heads}")
        if isinstance(self.search_budget, bool) or not isinstance(self.search_budget, int) or self.search_budget < 2:
            raise ValueError(f"search_budget: must be an integer >= 2 (the guard's reference and one candidate), "
                             f"got {self.search_budget!r}")
        if self.factor < 2:
            raise ValueError(f"factor: must be >= 2 (the study extends the context), got {self.factor}")
        if self.train_len < MIN_PROMPT:
            raise ValueError(f"train_len: must be >= {MIN_PROMPT} bytes to hold a passkey prompt, got {self.train_len}")
        if not 0 <= self.passkey_share < 1:
            raise ValueError(f"passkey_share: must be in [0, 1), got {self.passkey_share}")
        if isinstance(self.pose_window, bool) or not isinstance(self.pose_window, int) or not (
                self.pose_window == 0 or MIN_PROMPT <= self.pose_window < self.long_len):
            raise ValueError(f"pose_window: must be 0 (no PoSE run) or in [{MIN_PROMPT}, {self.long_len}) bytes "
                             f"(a passkey prompt fits, shorter than factor x train_len), got {self.pose_window!r}")

    @property
    def long_len(self) -> int:
        return self.train_len * self.factor

    @property
    def eval_lengths(self) -> list[int]:
        """L, 2L, 4L, ... up to factor * L."""
        out, n = [], self.train_len
        while n <= self.long_len:
            out.append(n)
            n *= 2
        if out[-1] != self.long_len:
            out.append(self.long_len)
        return out


QUICK = StudySizes(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, train_len=256, factor=4,
                   pretrain_steps=150, pretrain_batch=8, pretrain_lr=3e-3, finetune_steps=6, finetune_batch=1,
                   finetune_lr=5e-4, finetune_warmup=2, eval_windows=2, passkey_samples=6, max_files=120,
                   pose_window=256, search_budget=32, search_population=8, search_needles=1)


# ---------------------------------------------------------------------- data
def stdlib_files(max_files: int) -> tuple[list[str], list[str]]:
    """(train, held-out) document texts from the Python standard library's *.py files.

    Files are split by a hash of their path (about 1 in 8 held out), so the split is the same everywhere;
    test folders are skipped. ``max_files`` caps the training documents (sorted by path).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    train_docs, held_out = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "test" in rel.split("/")[0] or "site-packages" in rel or "idlelib" in rel:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        if zlib.crc32(rel.encode()) % 8 == 0:
            held_out.append(text)
        elif len(train_docs) < max_files:
            train_docs.append(text)
    if not train_docs or not held_out:
        raise ValueError(f"data: no Python sources found under {root}")
    return train_docs, held_out


def passkey_ids(length: int, depth: float, key: str) -> list[int]:
    """``length`` byte tokens: the shared passkey prompt (``evaluation.passkey.passkey_prompt``, no instruction)
    with the key sentence at ``depth`` (0..1) of the filler, then the answer " KEY" as the last ANSWER_LEN bytes."""
    answer = answer_ids(BYTES, key)
    return passkey_prompt(BYTES, length - len(answer), depth, key, instruction="").input_ids.tolist() + answer


def passkey_rows(count: int, length: int, rng: random.Random) -> PackedRows:
    """``count`` rows of single passkey prompts at random depths and keys, positions 0..length-1."""
    ids = []
    for _ in range(count):
        key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
        ids.append(passkey_ids(length, rng.random(), key))
    input_ids = torch.tensor(ids, dtype=torch.long)
    positions = torch.arange(length).expand(count, length).clone()
    labels = input_ids.clone()
    labels[:, 0] = -100
    return PackedRows(input_ids, positions, labels)


def mixed_rows(docs: list[str], length: int, passkey_share: float, seed: int) -> PackedRows:
    """Packed source-code rows plus passkey rows (``passkey_share`` of the total)."""
    code = pack_documents(tokenize_documents(docs, BYTES), length)
    n_passkey = int(round(len(code) * passkey_share / (1 - passkey_share))) if passkey_share else 0
    if n_passkey == 0:
        return code
    keys = passkey_rows(n_passkey, length, random.Random(seed))
    return PackedRows(torch.cat((code.input_ids, keys.input_ids)), torch.cat((code.position_ids, keys.position_ids)),
                      torch.cat((code.labels, keys.labels)))


def pose_mixture(docs: list[str], window: int, passkey_share: float, seed: int) -> PackedRows:
    """PoSE rows: source code as consecutive ``window``-byte windows plus passkey prompts of ``window`` bytes
    (``passkey_share`` of the total); the training loop gives each row its skipped position ids per step."""
    from ropekit.training.pose import pose_windows

    code = pose_windows(tokenize_documents(docs, BYTES), window)
    n_passkey = int(round(len(code) * passkey_share / (1 - passkey_share))) if passkey_share else 0
    if n_passkey == 0:
        return code
    keys = passkey_rows(n_passkey, window, random.Random(seed))
    return PackedRows(torch.cat((code.input_ids, keys.input_ids)), torch.cat((code.position_ids, keys.position_ids)),
                      torch.cat((code.labels, keys.labels)))


def activation_bytes(model, rows: PackedRows, forward_kwargs: dict) -> int:
    """Bytes of the tensors one training forward of ``rows`` keeps for backward (activations; parameters and
    the optimizer state, the same for every run, are not counted). Storages are counted once."""
    from ropekit.training.finetune import loss_forward

    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), loss_forward(model):
        model(input_ids=rows.input_ids, labels=rows.labels, **forward_kwargs)
    return sum(storages.values())


def held_out_windows(docs: list[str], length: int, count: int) -> list:
    """The first ``length`` bytes of the first ``count`` held-out files that long (TokenWindow list)."""
    from ropekit.evaluation import TokenWindow

    out = []
    for i, text in enumerate(docs):
        ids = BYTES.encode(text)
        if len(ids) >= length:
            out.append(TokenWindow(f"held-out-{i}", torch.tensor(ids[:length], dtype=torch.long)))
            if len(out) == count:
                return out
    raise ValueError(f"data: only {len(out)} held-out files have {length} bytes; lower --eval-windows or the sizes")


# ---------------------------------------------------------------------- model
def build_model(sizes: StudySizes):
    """A fresh Llama-style causal LM (random init, seeded) whose trained length is sizes.train_len."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(sizes.seed)
    config = LlamaConfig(vocab_size=BYTES.vocab_size, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                         num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                         num_key_value_heads=sizes.kv_heads, max_position_embeddings=sizes.train_len,
                         rope_theta=sizes.rope_base, eos_token_id=BYTES.eos_token_id, bos_token_id=None,
                         pad_token_id=None, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def method_config(base: RopeConfig, method: str, factor: float) -> RopeConfig:
    """The pretrained RoPE extended by ``method`` to factor * L (no scaling: unchanged). LongRoPE's factors
    come from a search (``search_longrope``), not from here."""
    if method == "default":
        return base
    if method == "longrope":
        raise ValueError("method: longrope needs searched factors (search_longrope)")
    return base.extend(method, float(factor))


def search_longrope(model, base: RopeConfig, sizes: StudySizes, train_docs: list[str], progress: bool = True,
                    ) -> tuple[RopeConfig, dict[str, Any]]:
    """LongRoPE long factors for the pretrained ``model`` at factor * L, found by ``ropekit.search`` (the same
    search as ``ropekit search``: seeded with PI/NTK/YaRN, needle-driven perplexity with a short-range guard)
    on the training text, never on the held-out files. Returns (the longrope RopeConfig, the search record)."""
    from ropekit.evaluation.data import Document
    from ropekit.hf.load import LoadedModel
    from ropekit.search.run import SearchOptions, factors_config, search_factors

    loaded = LoadedModel(model=model, tokenizer=BYTES, rope=base, family=model.config.model_type, source="study")
    documents = [Document(f"study-train-{i}", text) for i, text in enumerate(train_docs)]
    # The study's model never learns retrieval (0% passkey even at 1x), so the answer NLL is mostly noise: the
    # text NLL gets the weight, and few needles keep the question/answer block at the haystack's end short, so
    # that the scored text reaches the long positions (with 8 needles, a 2048-byte haystack's text ended before
    # position ~900 and the search picked factors that were worse than YaRN's on held-out text). Every pair is a
    # gene (LongRoPE v1): the 16-pair model has only 9 from the critical dimension on. Generations are not the
    # limit: the budget is, with early stopping after 6 flat generations.
    options = SearchOptions(target_length=sizes.long_len, budget=sizes.search_budget,
                            population=sizes.search_population, generations=10 * sizes.search_budget, patience=6,
                            needles=sizes.search_needles, genes="all", text_weight=4.0, seed=sizes.seed)
    result = search_factors(loaded, options, None, documents=documents, data_name="study training text",
                            model_name="study", progress=progress)
    record = dict(result.factors["search"])
    record["long_factor"] = result.factors["long_factor"]
    record["attention_factor"] = result.factors["attention_factor"]
    return factors_config(base, result.factors), record


# ---------------------------------------------------------------------- evaluation
@torch.inference_mode()
def passkey_accuracy(model, cfg: RopeConfig, length: int, samples: int, seed: int) -> float:
    """Share of prompts whose KEY_DIGITS answer bytes are all the model's argmax given the prompt before each
    (teacher forcing: equal to greedy decoding of the key). Depths spread evenly over 0.05..0.95."""
    from ropekit.hf import apply_rope

    rng = random.Random(seed * 7919 + length)
    prompts = []
    for i in range(samples):
        depth = 0.05 + 0.9 * i / max(1, samples - 1)
        key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
        prompts.append(passkey_ids(length, depth, key))
    ids = torch.tensor(prompts, dtype=torch.long)
    correct = 0
    with apply_rope(model, cfg):
        for start in range(0, samples, 4):
            batch = ids[start:start + 4]
            logits = model(input_ids=batch, use_cache=False).logits
            correct += int(keys_correct(logits, batch).sum())
    return correct / samples


def keys_correct(logits: torch.Tensor, input_ids: torch.Tensor, answer_len: int = ANSWER_LEN) -> torch.Tensor:
    """(batch,) bool: the argmax at each of the ``answer_len`` positions before the last ones equals the next
    byte, i.e. the model writes the whole answer " KEY" (logits (batch, seq, vocab), input_ids (batch, seq))."""
    guess = logits[:, -answer_len - 1:-1].argmax(-1)
    return (guess == input_ids[:, -answer_len:]).all(-1)


def evaluate_methods(model, configs: dict[str, RopeConfig], sizes: StudySizes, windows: dict[int, list],
                     stage: str, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Perplexity per length (and per bucket at the longest) plus passkey accuracy per length, per method."""
    from tqdm.auto import tqdm

    from ropekit.evaluation import MethodRun, evaluate_perplexity

    lengths = sizes.eval_lengths
    bucket = max(1, sizes.train_len // 4)
    out: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(configs) * len(lengths), desc=f"evaluate ({stage})", disable=not progress,
               dynamic_ncols=True)
    for method, cfg in configs.items():
        # One bar for the whole evaluation (ticks per method and length) instead of one per window.
        results = evaluate_perplexity(model, [MethodRun(f"{METHOD_LABELS[method]} ({stage})", cfg)], lengths,
                                      windows, bucket_size=bucket, progress=False)
        passkey = {}
        for n in lengths:
            passkey[n] = passkey_accuracy(model, cfg, n, sizes.passkey_samples, sizes.seed)
            bar.update(1)
        longest = results[-1]
        out[method] = {"ppl": {r.length: r.ppl for r in results}, "passkey": passkey,
                       "bucket_size": bucket, "bucket_ppl": longest.bucket_ppl, "rope": cfg.to_dict()}
        bar.write(f"  {METHOD_LABELS[method]:<12} {stage:<15} ppl " +
                  " ".join(f"{n}:{_ppl(r.ppl)}" for n, r in zip(lengths, results)) +
                  "  passkey " + " ".join(f"{n}:{v:.0%}" for n, v in passkey.items()))
    bar.close()
    return out


# ---------------------------------------------------------------------- the study
def run_study(out_dir: str | Path, sizes: StudySizes = StudySizes(), methods: tuple[str, ...] = STUDY_METHODS,
              progress: bool = True, log=print, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the whole study and write the report folder; returns the results dict (also results.json).

    The folder is checked before any work and written through ``ropekit.output.OutputDir`` (files ropekit did
    not write are refused unless ``overwrite``, and kept either way)."""
    from ropekit.hf import apply_rope
    from ropekit.output import OutputDir, check_output_dir

    for m in methods:
        if m not in STUDY_METHODS:
            raise ValueError(f"methods: {m!r} not accepted; accepted: {', '.join(STUDY_METHODS)}")
    check_output_dir(out_dir, overwrite=overwrite)
    out = Path(out_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    train_docs, held_out = stdlib_files(sizes.max_files)
    windows = {n: held_out_windows(held_out, n, sizes.eval_windows) for n in sizes.eval_lengths}

    # 1. pretrain at L
    log(f"[study] pretraining a {sizes.layers}-layer, hidden-{sizes.hidden} model at {sizes.train_len} tokens "
        f"for {sizes.pretrain_steps} steps")
    t0 = time.perf_counter()
    model = build_model(sizes)
    n_params = sum(p.numel() for p in model.parameters())
    pre_rows = mixed_rows(train_docs, sizes.train_len, sizes.passkey_share, sizes.seed)
    pre_settings = FinetuneSettings(seq_len=sizes.train_len, steps=sizes.pretrain_steps, lr=sizes.pretrain_lr,
                                    warmup=max(1, sizes.pretrain_steps // 20), weight_decay=0.1,
                                    batch_size=sizes.pretrain_batch, gradient_checkpointing=False,
                                    decay="cosine", seed=sizes.seed)
    base_cfg = RopeConfig.from_hf(model.config)
    with apply_rope(model, base_cfg):
        pretrain = train(model, pre_rows, pre_settings, progress=progress, desc="pretrain")
    timings["pretrain_s"] = time.perf_counter() - t0
    model.eval()

    search = None
    if "longrope" in methods:
        log(f"[study] searching LongRoPE factors for {sizes.long_len} bytes ({sizes.search_budget} forwards)")
        t0 = time.perf_counter()
        searched, search = search_longrope(model, base_cfg, sizes, train_docs, progress)
        timings["search_s"] = time.perf_counter() - t0
    configs = {m: searched if m == "longrope" else method_config(base_cfg, m, sizes.factor) for m in methods}
    t0 = time.perf_counter()
    before = evaluate_methods(model, configs, sizes, windows, "no fine-tuning", progress)
    timings["evaluate_before_s"] = time.perf_counter() - t0

    # 2. fine-tune each method at factor * L
    long_rows = mixed_rows(train_docs, sizes.long_len, sizes.passkey_share, sizes.seed + 1)
    ft_settings = FinetuneSettings(seq_len=sizes.long_len, steps=sizes.finetune_steps, lr=sizes.finetune_lr,
                                   warmup=sizes.finetune_warmup, batch_size=sizes.finetune_batch,
                                   gradient_checkpointing=False, seed=sizes.seed)
    after: dict[str, Any] = {}
    curves: dict[str, list] = {}
    t0 = time.perf_counter()
    for method, cfg in configs.items():
        tuned = copy.deepcopy(model)
        patch = apply_rope(tuned, cfg)
        if cfg.length_dependent:
            patch.fix_length(sizes.long_len)
        result = train(tuned, long_rows, ft_settings, progress=progress, desc=f"fine-tune {METHOD_LABELS[method]}")
        patch.remove()
        curves[method] = result.history
        after.update(evaluate_methods(tuned, {method: cfg}, sizes, windows, "fine-tuned", progress))
        del tuned
    timings["finetune_and_evaluate_s"] = time.perf_counter() - t0

    pose = None
    if sizes.pose_window:
        t0 = time.perf_counter()
        pose = pose_comparison(model, configs, sizes, train_docs, long_rows, ft_settings, curves, after, windows,
                               progress, log)
        timings["pose_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    results = {"sizes": dataclasses.asdict(sizes), "parameters": n_params, "methods": list(methods),
               "eval_lengths": sizes.eval_lengths, "pretrain_rows": len(pre_rows), "finetune_rows": len(long_rows),
               "before": before, "after": after, "pretrain_history": pretrain.history, "finetune_history": curves,
               "timings": timings, "torch_threads": torch.get_num_threads()}
    if pose is not None:
        results["pose"] = pose
    if search is not None:
        results["search"] = search
    with OutputDir(out, command="study", overwrite=overwrite) as folder:
        folder.write_text("results.json", json.dumps(results, indent=2))
        plot_position(results, folder.path("ppl_vs_position.png"))
        plot_curves(results, folder.path("training_curves.png"))
        folder.write_text("summary.md", summary_markdown(results))
    log(f"[study] wrote {out / 'summary.md'} in {timings['total_s'] / 60:.1f} min")
    return results


def pose_comparison(model, configs: dict[str, RopeConfig], sizes: StudySizes, train_docs: list[str],
                    long_rows: PackedRows, ft_settings: FinetuneSettings, curves: dict, after: dict, windows: dict,
                    progress: bool, log) -> dict[str, Any]:
    """Fine-tune the PoSE run (YaRN, or the last method) for ft_settings.steps on ``sizes.pose_window``-byte
    windows and return it beside the full-length run of the same method: train time, activation bytes, evaluation."""
    from ropekit.hf import apply_rope
    from ropekit.training.data import packed_forward_kwargs
    from ropekit.training.pose import PoseSpec, pose_forward_kwargs, step_position_ids

    method = "yarn" if "yarn" in configs else list(configs)[-1]
    cfg = configs[method]
    window = sizes.pose_window
    log(f"[study] PoSE: fine-tuning {METHOD_LABELS[method]} on {window}-byte windows with ids up to {sizes.long_len}")
    rows = pose_mixture(train_docs, window, sizes.passkey_share, sizes.seed + 2)
    settings = dataclasses.replace(ft_settings, pose=True, window=window)
    measure = copy.deepcopy(model)
    with apply_rope(measure, cfg) as patch:
        if cfg.length_dependent:
            patch.fix_length(sizes.long_len)
        measure.train()
        full_batch = long_rows.rows(list(range(ft_settings.batch_size)))
        full_bytes = activation_bytes(measure, full_batch, packed_forward_kwargs(full_batch.position_ids))
        pose_batch = rows.rows(list(range(ft_settings.batch_size)))
        ids = step_position_ids(PoseSpec(sizes.long_len, window, settings.pose_chunks), settings.seed, 0,
                                ft_settings.batch_size)
        pose_bytes = activation_bytes(measure, pose_batch, pose_forward_kwargs(ids))
    del measure
    tuned = copy.deepcopy(model)
    with apply_rope(tuned, cfg) as patch:
        if cfg.length_dependent:
            patch.fix_length(sizes.long_len)
        result = train(tuned, rows, settings, progress=progress, desc=f"PoSE {METHOD_LABELS[method]}")
    evaluation = evaluate_methods(tuned, {method: cfg}, sizes, windows, "PoSE fine-tuned", progress)[method]
    del tuned
    full_history = curves[method]
    return {"method": method, "window": window, "rows": len(rows),
            "full": {"train_s": sum(h["seconds"] for h in full_history), "activation_bytes": full_bytes,
                     "row_bytes": sizes.long_len, "ppl": after[method]["ppl"], "passkey": after[method]["passkey"]},
            "pose": {"train_s": sum(h["seconds"] for h in result.history), "activation_bytes": pose_bytes,
                     "row_bytes": window, "ppl": evaluation["ppl"], "passkey": evaluation["passkey"],
                     "bucket_ppl": evaluation["bucket_ppl"], "bucket_size": evaluation["bucket_size"],
                     "history": result.history}}


# ---------------------------------------------------------------------- report
def load_results(path: str | Path) -> dict[str, Any]:
    """results.json back into the in-memory form (JSON turned the length keys into strings)."""
    results = json.loads(Path(path).read_text())
    entries = [e for stage in ("before", "after") for e in results[stage].values()]
    if "pose" in results:
        entries += [results["pose"]["full"], results["pose"]["pose"]]
    for entry in entries:
        for key in ("ppl", "passkey"):
            entry[key] = {int(n): v for n, v in entry[key].items()}
    return results


def search_section(results: dict[str, Any]) -> list[str]:
    """What the LongRoPE search did and found (empty without one)."""
    search = results.get("search")
    if not search:
        return []
    best, yarn = search["best"], search["seeds"].get("yarn", {})
    from ropekit.search.plots import SEED_NAMES

    found = (f"the {SEED_NAMES.get(best['origin'].split(':', 1)[1], 'own')} seed (no candidate beat it)"
             if best["origin"].startswith("seed:") else f"a {best['origin']} of generation {best['generation']}")
    factors = ", ".join(f"{x:.2f}" for x in search["long_factor"])
    lines = [f"## LongRoPE factor search ({search['target_length']} bytes, before fine-tuning)", "",
             f"`ropekit.search` on the pretrained model, haystacks of training text (never the held-out files): "
             f"{search['forwards']} forwards in {search['wall_seconds_this_run']:.0f} s (stopped: {search['stopped']}); "
             f"{search['space']['gene_count']} genes from pair {search['space']['first_gene']} on. Best: {found}, "
             f"score {best['score']:.4f}"
             + (f" vs the YaRN seed's {yarn['score']:.4f} (needle NLL + text NLL + guard; lower is better)."
                if yarn else "."),
             f"long_factor: [{factors}]; attention factor {search['attention_factor']:.4f}.", ""]
    return lines


def pose_section(results: dict[str, Any]) -> list[str]:
    """The PoSE vs full-length table and what it shows (empty without a PoSE run)."""
    pose = results.get("pose")
    if not pose:
        return []
    s = results["sizes"]
    lengths = results["eval_lengths"]
    short, longest = lengths[0], lengths[-1]
    label = METHOD_LABELS[pose["method"]]
    lines = [f"## PoSE vs full-length fine-tuning ({label}, {s['finetune_steps']} steps each, same lr and batch)",
             "",
             f"| run | training row | train time | activations kept for backward | ppl at {short} | "
             f"ppl at {longest} | passkey at {longest} |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in (("full length", pose["full"]), (f"PoSE, window {pose['window']}", pose["pose"])):
        lines.append(f"| {name} | {entry['row_bytes']} bytes | {entry['train_s']:.1f} s | "
                     f"{entry['activation_bytes'] / 2**20:.1f} MiB | {_ppl(entry['ppl'][short])} | "
                     f"{_ppl(entry['ppl'][longest])} | {entry['passkey'][longest]:.0%} |")
    full, cheap = pose["full"], pose["pose"]
    before = results["before"][pose["method"]]["ppl"][longest]
    gained_full, gained_pose = before - full["ppl"][longest], before - cheap["ppl"][longest]
    share = gained_pose / gained_full if gained_full > 0 else float("nan")
    verdict = ("NOT seen: full-length fine-tuning did not improve on no fine-tuning here" if gained_full <= 0 else
               "seen" if share >= 0.9 else f"partly seen: {share:.0%} of the full-length gain" if share > 0 else
               "NOT seen")
    lines += ["",
              f"- PoSE at {longest // short}x: ppl {_ppl(before)} before fine-tuning -> {_ppl(cheap['ppl'][longest])} "
              f"(full length: {_ppl(full['ppl'][longest])}) for {cheap['train_s'] / max(full['train_s'], 1e-9):.0%} "
              f"of the full-length training time and {cheap['activation_bytes'] / max(full['activation_bytes'], 1):.0%} "
              f"of its activation memory (paper claim: PoSE reaches the full-length result at a fraction of the "
              f"cost; {verdict})."]
    return lines


def plot_position(results: dict[str, Any], path: Path) -> None:
    """Perplexity per position bucket in the longest window, per method, before (solid) and after (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    fig, ax = plt.subplots(figsize=(11, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(results["methods"]):
        for stage, style in (("before", "-"), ("after", "--")):
            entry = results[stage][method]
            size = entry["bucket_size"]
            xs = [(b + 0.5) * size for b in range(len(entry["bucket_ppl"]))]
            label = f"{METHOD_LABELS[method]} ({'fine-tuned' if stage == 'after' else 'no fine-tuning'})"
            ax.plot(xs, entry["bucket_ppl"], style, color=colors[i % len(colors)], label=label)
    ax.axvline(sizes["train_len"], color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(f"position (bytes); grey line: trained length {sizes['train_len']}")
    ax.set_ylabel("perplexity per byte (bucket)")
    ax.set_title(f"perplexity vs position, {sizes['train_len'] * sizes['factor']}-byte windows")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Pretraining loss, and fine-tuning loss per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    pre = results["pretrain_history"]
    ax1.plot([h["step"] for h in pre], [h["loss"] for h in pre])
    ax1.set_title(f"pretraining at {results['sizes']['train_len']} bytes")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/byte)")
    for method, history in results["finetune_history"].items():
        ax2.plot([h["step"] for h in history], [h["loss"] for h in history], label=METHOD_LABELS[method])
    pose = results.get("pose")
    if pose:  # its loss is on short windows, so it is not comparable point for point with the long rows'
        history = pose["pose"]["history"]
        ax2.plot([h["step"] for h in history], [h["loss"] for h in history], ":",
                 label=f"{METHOD_LABELS[pose['method']]} PoSE ({pose['window']}-byte windows)")
    ax2.set_title(f"fine-tuning at {results['sizes']['train_len'] * results['sizes']['factor']} bytes")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict[str, Any], stage: str, key: str, fmt) -> list[str]:
    lengths = results["eval_lengths"]
    train_len = results["sizes"]["train_len"]
    head = "| method | " + " | ".join(f"{n} ({n // train_len}x)" for n in lengths) + " |"
    lines = [head, "|---" * (len(lengths) + 1) + "|"]
    for method in results["methods"]:
        values = results[stage][method][key]
        cells = [fmt(values.get(n, values.get(str(n)))) for n in lengths]
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    return lines


def _ppl(value: float) -> str:
    return f"{value:.3f}" if value < 1000 else f"{value:.3g}"


def summary_markdown(results: dict[str, Any]) -> str:
    """The report text: sizes, tables before/after, passkey, fine-tuning speed, wall time."""
    s = results["sizes"]
    t = results["timings"]
    long_len = s["train_len"] * s["factor"]
    lines = [
        "# ropekit study: train short, extend, fine-tune long",
        "",
        f"Model: Llama-style, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads "
        f"({s['kv_heads']} KV), {results['parameters'] / 1e6:.2f} M parameters, byte tokens (vocab 257), "
        f"RoPE base {s['rope_base']:g}.",
        f"Pretrained from scratch for {s['pretrain_steps']} steps x {s['pretrain_batch']} rows of "
        f"{s['train_len']} bytes (Python standard library sources, {s['passkey_share']:.0%} synthetic passkey "
        f"rows). Every method extends by factor {s['factor']} to {long_len} bytes; each is then fine-tuned "
        f"{s['finetune_steps']} steps x {s['finetune_batch']} rows of {long_len} bytes (lr {s['finetune_lr']:g}, "
        f"{s['finetune_warmup']} warm-up steps).",
        f"Perplexity: per byte, first N bytes of {s['eval_windows']} held-out files per length. Passkey: "
        f"{s['passkey_samples']} prompts per length, depths 5%..95%, exact match of the 5 key digits "
        "(teacher-forced argmax = greedy decoding).",
        "",
        "## Perplexity before fine-tuning",
        *_table(results, "before", "ppl", _ppl),
        "",
        "## Perplexity after fine-tuning",
        *_table(results, "after", "ppl", _ppl),
        "",
        "## Passkey accuracy before fine-tuning",
        *_table(results, "before", "passkey", lambda v: f"{v:.0%}"),
        "",
        "## Passkey accuracy after fine-tuning",
        *_table(results, "after", "passkey", lambda v: f"{v:.0%}"),
        "",
        f"## Fine-tuning loss at {long_len} bytes (training rows, nats/byte)",
    ]
    spans = loss_spans(s["finetune_steps"])
    lines.append("(mean over the steps of each span; every method sees the same rows at each step)")
    lines.append("")
    lines.append("| method | " + " | ".join(f"steps {a}-{b}" if a != b else f"step {a}" for a, b in spans) + " |")
    lines.append("|---" * (len(spans) + 1) + "|")
    for method, history in results["finetune_history"].items():
        means = span_means(history, spans)
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    lines += [
        "",
        f"Wall time: {t['total_s'] / 60:.1f} min (pretraining {t['pretrain_s'] / 60:.1f}, evaluation before "
        f"fine-tuning {t['evaluate_before_s'] / 60:.1f}, fine-tuning + evaluation "
        f"{t['finetune_and_evaluate_s'] / 60:.1f}"
        + (f", LongRoPE search {t['search_s'] / 60:.1f}" if "search_s" in t else "")
        + (f", PoSE run {t['pose_s'] / 60:.1f}" if "pose_s" in t else "")
        + f") with {results['torch_threads']} torch threads.",
        "",
        "Plots: ppl_vs_position.png (per-position perplexity in the longest window), training_curves.png.",
        "",
        *search_section(results),
        *pose_section(results),
        *([""] if results.get("pose") else []),
        "## What this run shows",
        *observations(results),
        "",
    ]
    return "\n".join(lines)


def loss_spans(steps: int, parts: int = 4) -> list[tuple[int, int]]:
    """Up to ``parts`` consecutive (first, last) step ranges covering 1..steps."""
    size = max(1, math.ceil(steps / parts))
    return [(a, min(a + size - 1, steps)) for a in range(1, steps + 1, size)]


def span_means(history: list[dict], spans: list[tuple[int, int]]) -> list[float]:
    """Mean training loss over each span of steps."""
    by_step = {h["step"]: h["loss"] for h in history}
    return [sum(by_step[i] for i in range(a, b + 1)) / (b - a + 1) for a, b in spans]


def observations(results: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers, next to the papers' claims (no claim is assumed true)."""
    before, after = results["before"], results["after"]
    lengths = results["eval_lengths"]
    short, longest = lengths[0], lengths[-1]
    get = lambda table, m, n: table[m]["ppl"][n]  # noqa: E731
    out = []
    if "default" in before:
        b = before["default"]["ppl"]
        out.append(f"- No scaling, no fine-tuning: ppl {_ppl(b[short])} at the trained length, {_ppl(b[longest])} at "
                   f"{longest // short}x (paper claim: explodes past the trained length; "
                   f"{'seen here' if b[longest] > 2 * b[short] else 'NOT seen here'}).")
    if "default" in before and "linear" in before:
        d, l0 = get(before, "default", short), get(before, "linear", short)
        out.append(f"- PI without fine-tuning at the trained length: {_ppl(l0)} vs {_ppl(d)} unscaled "
                   f"(claim: short contexts degrade; {'seen' if l0 > d * 1.05 else 'NOT seen'}).")
        if "linear" in after:
            l1 = get(after, "linear", short)
            ll0, ll1 = get(before, "linear", longest), get(after, "linear", longest)
            closed = (l0 - l1) / (l0 - d) if l0 > d else float("nan")
            verdict = ("NOT seen" if not (l1 < l0 and ll1 < ll0) else
                       f"partly seen: {closed:.0%} of the short-context gap to the unscaled model closed"
                       if l1 > d * 1.05 else "seen")
            out.append(f"- PI after {results['sizes']['finetune_steps']} fine-tuning steps: {_ppl(l1)} at the "
                       f"trained length, {_ppl(ll0)} -> {_ppl(ll1)} at {longest // short}x (claim: recovers "
                       f"after a few hundred steps; {verdict}).")
    if "linear" in after and "yarn" in after:
        hist = results["finetune_history"]
        spans = loss_spans(results["sizes"]["finetune_steps"])
        means = {m: span_means(hist[m], spans) for m in ("linear", "yarn")}
        first = {m: means[m][0] for m in means}
        last = {m: means[m][-1] for m in means}
        y, p = get(after, "yarn", longest), get(after, "linear", longest)
        out.append(f"- YaRN vs PI at {longest // short}x: before fine-tuning {_ppl(get(before, 'yarn', longest))} vs "
                   f"{_ppl(get(before, 'linear', longest))}; after {_ppl(y)} vs {_ppl(p)}; fine-tuning loss "
                   f"{first['yarn']:.3f}->{last['yarn']:.3f} vs {first['linear']:.3f}->{last['linear']:.3f} (first -> last span) "
                   f"(claim: YaRN needs fewer steps for the same result; "
                   f"{'consistent' if y <= p and first['yarn'] <= first['linear'] else 'NOT seen'} here).")
    if "longrope" in before and "yarn" in before:
        lb, yb = get(before, "longrope", longest), get(before, "yarn", longest)
        line = (f"- Searched LongRoPE vs YaRN at {longest // short}x, no fine-tuning: ppl {_ppl(lb)} vs {_ppl(yb)} on "
                f"held-out files")
        if "longrope" in after and "yarn" in after:
            line += f"; after fine-tuning {_ppl(get(after, 'longrope', longest))} vs {_ppl(get(after, 'yarn', longest))}"
        line += (f"; at the trained length {_ppl(get(before, 'longrope', short))} vs {_ppl(get(before, 'yarn', short))} "
                 f"(claim: searched factors beat YaRN without fine-tuning; "
                 f"{'seen' if lb < yb * 0.99 else 'a tie within 1%' if lb < yb * 1.01 else 'NOT seen'} here).")
        out.append(line)
    passkey = [f"{METHOD_LABELS[m]} {before[m]['passkey'][longest]:.0%} -> {after[m]['passkey'][longest]:.0%}"
               for m in results["methods"] if m in after]
    best_short = max(before[m]["passkey"][short] for m in results["methods"])
    out.append(f"- Passkey at {longest // short}x before -> after fine-tuning: {'; '.join(passkey)}. At the trained "
               f"length the best method retrieves {best_short:.0%}"
               + (" — the model never learned the task in pretraining, so the retrieval columns say nothing about "
                  "the methods." if best_short == 0 else "."))
    out.append("- A model this small, trained for minutes, is a toy: treat differences of a few percent as noise "
               "(one seed, a handful of held-out files).")
    return out
