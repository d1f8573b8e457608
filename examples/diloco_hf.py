"""Fine-tune a Hugging Face causal LM with DiLoCo: cotrain launch --nproc 4 examples/diloco_hf.py
MODEL_DIR TEXT_FILE [STEPS]. Add a worker mid-run with the command `cotrain launch` prints."""

import hashlib
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cotrain.comm import CommConfig, Communicator
from cotrain.core.config import config_from_env
from cotrain.diloco import DiLoCo

model_dir, text, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]) if sys.argv[3:] else 200
rank, world = int(os.environ["COTRAIN_WORKER_INDEX"]), int(os.environ["COTRAIN_WORLD"])
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(model_dir)  # same weights on every worker
ids = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(Path(text).read_text())["input_ids"])
shard = ids.chunk(8)[rank % 8]  # this worker's own slice of the text
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

comm = Communicator(config_from_env(CommConfig, "COTRAIN_COMM__"), name=f"w{rank}")
comm.connect()
# min_workers: a survivor of a crash waits (up to 10 min) for a replacement to join
with DiLoCo(
    comm, model, opt, sync_every=10, total_steps=steps, world=world, min_workers=world
) as d:
    while d.inner_step < steps:  # a worker that joins late starts where the run is
        g = torch.Generator().manual_seed(1000 * rank + d.inner_step)
        starts = torch.randint(0, len(shard) - 65, (8,), generator=g).tolist()
        x = torch.stack([shard[s : s + 65] for s in starts])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        d.step(tokens=x.numel())
comm.close()
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().tobytes()
print(f"worker {rank}: step {d.inner_step}, params sha256 {hashlib.sha256(flat).hexdigest()}")
