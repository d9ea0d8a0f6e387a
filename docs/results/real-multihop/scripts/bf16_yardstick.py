"""How far the same model run in bf16 (weights and activations, as most deployments run it) moves Qwen2.5-0.5B's
answer from its fp32 full prefill on the MuSiQue development cases, as a yardstick for the methods' fidelity figures:
first-token agreement, and KL(full || bf16) over the first 8 answer positions, teacher-forced along full prefill's
answer exactly as `prophet_rag.bench.fidelity` measures the methods. Also prints how sure full prefill itself is of
its first answer token (its top-1 probability), by case.

    python bf16_yardstick.py MODEL_DIR MUSIQUE_JSON RECORDS_JSONL OUT_JSONL REFERENCE_DIR...

REFERENCE_DIR: the bench's `reference/MODEL_NAME` folders (full prefill's `musique-N.fidelity.pt` per case, the first
found wins); RECORDS_JSONL: the merged records, whose cases are measured. Resumes from OUT_JSONL.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from prophet_rag import ProphetEngine
from prophet_rag.bench.musique import MUSIQUE_PROMPT, load_musique

model_dir, musique, records_path, out_path, *reference_dirs = sys.argv[1:]
records = [json.loads(line) for line in open(records_path)]
cases = sorted({r["case_id"] for r in records}, key=lambda c: int(c.split("-")[1]))
references = {}
for folder in reference_dirs:
    for path in Path(folder).glob("musique-*.fidelity.pt"):
        references.setdefault(path.name.split(".")[0], path)
out = Path(out_path)
done = {json.loads(line)["case_id"] for line in out.open()} if out.exists() else set()
# The engine only builds the prompt ids, exactly as the bench's engine did (CacheBlend's instruction).
engine = ProphetEngine.from_pretrained(model_dir, prompt=MUSIQUE_PROMPT)
bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
with out.open("a") as sink:
    for case_id in cases:
        if case_id in done:
            continue
        index = int(case_id.split("-")[1])
        case = load_musique(musique, range(index, index + 1))[0]
        reference = torch.load(references[case_id])
        forced = [int(t) for t in reference["forced"]]
        ids = engine.builder.layout(case.chunks, case.query).joined_ids()[None]
        with torch.inference_mode():
            logits = bf16(torch.cat([ids, torch.tensor([forced[:-1]], dtype=torch.long)], dim=1),
                          logits_to_keep=len(forced)).logits
        log_probs = torch.log_softmax(logits[0].float(), dim=-1)
        full = reference["log_probs"].float()
        n = min(len(forced), full.shape[0])
        kl = float((full[:n].exp() * (full[:n] - log_probs[:n])).sum(dim=-1).mean())
        record = {"case_id": case_id, "perturbation": "model in bf16",
                  "first_token_agree": int(torch.argmax(log_probs[0])) == forced[0], "kl8": kl,
                  "full_top1_probability": float(full[0].exp().max())}
        sink.write(json.dumps(record) + "\n")
        sink.flush()
rows = [json.loads(line) for line in out.open()]
print(f"{len(rows)} cases; bf16 first-token agreement {sum(r['first_token_agree'] for r in rows) / len(rows):.3f}, "
      f"mean KL8 {sum(r['kl8'] for r in rows) / len(rows):.5f}")
top1 = sorted(r["full_top1_probability"] for r in rows)
print("full prefill's first-token top-1 probability, quartiles:",
      [round(top1[int(q * (len(top1) - 1))], 3) for q in (0, 0.25, 0.5, 0.75, 1)])
