"""Held-out evaluation of a demo search (how searches/smollm2-135m-16k.json got its held_out figures):
perplexity at 16384 and 8192 on a standard-library document the search did not use.

usage: EVAL_DTYPE=float32 python scripts/evaluate_search_heldout.py SEARCH_DIR/search-state.json OUT_JSON RUN [RUN...]; RUN = yarn | default | factors=PATH
One window: the first 16384 tokens of the first stdlib document (largest first) that the search's haystack did
not use and that has >= 16384 tokens. yarn/default are length-independent: the 8192 figure is the first 8192
tokens of the 16k forward (identical by causality). longrope switches on length: 8192 gets its own forward.
"""
import json, sys, time
from ropekit.hf import load_model
from ropekit.evaluation.data import load_documents, token_windows
from ropekit.evaluation.perplexity import window_nll, summarize_nll
from ropekit.search import factors_config

DTYPE = __import__("os").environ.get("EVAL_DTYPE", "bfloat16")
state = json.load(open(sys.argv[1]))
used = set(state["fingerprint"]["documents"])
out_path = sys.argv[2]
loaded = load_model("demo", dtype=DTYPE, device="cpu")
docs = (d for d in load_documents(None) if d.name not in used)
win = token_windows(docs, loaded.tokenizer, 16384, count=1)[0]
print("held-out window:", win.name, flush=True)
results = json.load(open(out_path)) if __import__("os").path.exists(out_path) else {}
base = loaded.rope
for run in sys.argv[3:]:
    t = time.time()
    if run == "yarn":
        cfg = base.extend("yarn", target_length=16384)
        nll = window_nll(loaded.model, [win.input_ids], cfg)
        rec = {"16384": summarize_nll(nll, 1024)[0], "8192": summarize_nll(nll[:, :8191], 1024)[0],
               "bucket_ppl_16384": summarize_nll(nll, 1024)[1]}
    elif run == "default":
        nll = window_nll(loaded.model, [win.input_ids[:8192]], base)
        rec = {"8192": summarize_nll(nll, 1024)[0]}
    else:
        path = run.split("=", 1)[1]
        cfg = factors_config(loaded, json.load(open(path)))
        nll = window_nll(loaded.model, [win.input_ids], cfg)
        nll8 = window_nll(loaded.model, [win.input_ids[:8192]], cfg)
        rec = {"16384": summarize_nll(nll, 1024)[0], "8192": summarize_nll(nll8, 1024)[0],
               "bucket_ppl_16384": summarize_nll(nll, 1024)[1], "factors": path}
    rec["window"] = win.name
    rec["seconds"] = round(time.time() - t, 1)
    results[run.split("=")[0] if run.startswith("factors") else run] = rec
    json.dump(results, open(out_path, "w"), indent=1)
    print(run, rec, flush=True)
