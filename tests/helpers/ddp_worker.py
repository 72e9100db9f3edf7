"""One rank of the DDP test (``tests/e2e/test_ddp.py`` launches it with torchrun).

Two continual tasks on the tiny model with ``SecuraSFTTrainer`` + ``SecuraCallback``:
SECURA with M1 merges every 2 steps, online EWC, replay. Each rank then writes what it
holds (adapter tensors incl. ``U_acc`` and merge count, EWC state, replay buffer, its
local and all-reduced Fisher, a hash of its mixed training set) for the test to compare.

Usage (``tests/`` on PYTHONPATH): torchrun --nproc_per_node 2 tests/helpers/ddp_worker.py OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

MERGE_EVERY = 2
STEPS = 4


def main(out: Path) -> None:
    import torch.distributed as dist
    from accelerate.utils import extract_model_from_parallel
    from datasets import Dataset
    from safetensors.torch import save_file

    from helpers.trl_helpers import sft_config
    from secura_plugins import AdapterConfig
    from secura_plugins.continual import EWC, ReplayBuffer
    from secura_plugins.integrations.trl import SecuraCallback, SecuraSFTTrainer
    from secura_plugins.io import adapter_tensors
    from secura_plugins.recipe import builtin_rows
    from secura_plugins.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(vocab_size=len(tok), seed=0)
    ewc = EWC(lam=1.0e4, fisher_max_batches=2)
    buffer = ReplayBuffer(capacity=16, seed=0, ratio=0.25)
    config = AdapterConfig(
        r=4, k=8, merge="m1", merge_every=MERGE_EVERY, target_modules=["q_proj", "up_proj"]
    )
    mixed_hashes = []
    trainer = None
    for t, name in enumerate(["add", "upper"]):
        args = sft_config(
            out / f"task{t}",
            max_steps=STEPS,
            per_device_train_batch_size=4,
            learning_rate=1.0e-2,
            logging_steps=2,
            ddp_backend="gloo",
        )
        callback = SecuraCallback(config if t == 0 else None, ewc=ewc, replay=buffer)
        trainer = SecuraSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(builtin_rows(name, 32, seed=0)),
            processing_class=tok,
            callbacks=[callback],
            replay=buffer,
            task_name=name,
        )
        rows = trainer.train_dataset.to_list()
        mixed_hashes.append(hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest())
        trainer.train()
        model = extract_model_from_parallel(trainer.model)

    rank = dist.get_rank()
    assert dist.get_world_size() == 2 and dist.get_backend() == "gloo"
    assert trainer.args.parallel_mode.name == "DISTRIBUTED"
    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in adapter_tensors(model, "default").items()}
    tensors.update({f"fisher.{k}": v.contiguous() for k, v in ewc.fisher.items()})
    tensors.update({f"anchor.{k}": v.contiguous() for k, v in ewc.anchors.items()})
    loader = trainer.get_train_dataloader()  # this rank's shard
    local = ewc.estimate_fisher(model, loader, max_batches=2, all_reduce=False)
    reduced = ewc.estimate_fisher(model, loader, max_batches=2)
    tensors.update({f"local.{k}": v.contiguous() for k, v in local.items()})
    tensors.update({f"reduced.{k}": v.contiguous() for k, v in reduced.items()})
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    state = buffer.state_dict()
    (out / f"rank{rank}.json").write_text(
        json.dumps({"replay": state, "mixed": mixed_hashes, "ewc_tasks": ewc.num_tasks})
    )
    dist.barrier()


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid> prints where a rank waits
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    main(Path(sys.argv[1]))
