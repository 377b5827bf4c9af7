"""Dense language-model pretraining: the objective and the `adadepth pretrain` job."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from adadepth import runs
from adadepth.config import PretrainConfig, dump_yaml
from adadepth.data import build_tokenizer, load_corpus, prepare_tokens
from adadepth.errors import UserError
from adadepth.flops import causal_context, train_per_token
from adadepth.model import Transformer
from adadepth.train import checkpoint as ck
from adadepth.train.loop import LoopResult, StepOutput, resolve_device, seed_everything, train
from adadepth.train.parallel import is_main


class LanguageModeling(nn.Module):
    """Next-token cross-entropy on the whole model."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor, step: int) -> StepOutput:
        loss = self.model(x).loss(y)
        flops = train_per_token(self.model.cfg, causal_context(x.shape[1])) * y.numel()
        return StepOutput(loss=loss, flops=flops)

    def lm_loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model(x).loss(y)

    def checkpoint_state(self) -> dict[str, Tensor]:
        return ck.unique_state(self.model)

    def load_checkpoint_state(self, tensors: dict[str, Tensor]) -> None:
        self.model.load_state_dict(tensors, strict=False)


def pretrain(cfg: PretrainConfig, out: Path, resume: bool = False,
             show_progress: bool = True) -> LoopResult:
    if cfg.train.steps < 1:
        raise UserError("pretraining needs train.steps of 1 or more")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    corpus = load_corpus(cfg.data.corpus, val_fraction=cfg.data.val_fraction,
                         max_docs=cfg.data.max_docs, text_field=cfg.data.text_field)
    tokenizer = build_tokenizer(cfg.data.tokenizer, corpus)
    data = prepare_tokens(corpus, tokenizer)
    data.check_block(cfg.data.block_size)
    cfg.model.vocab_size = tokenizer.vocab_size
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.data.block_size)
    cfg.model.check()
    if resume and (out / runs.CONFIG).is_file():
        runs.check_compatible(out, {"kind": "dense", "model": cfg.model.model_dump()})
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = Transformer(cfg.model).to(device)
    # eval and route read the data config back, to evaluate on the corpus and context trained on.
    if is_main():  # under torchrun, one process writes the run folder
        runs.write_run_config(out, "dense", cfg.model, tokenizer,
                              extra={"preset": cfg.preset, "data": cfg.data.model_dump()})
        dump_yaml(cfg, out / "config.yaml")
    return train(LanguageModeling(model), data, cfg.train, cfg.optim, cfg.data.block_size, out,
                 resume=resume, desc=f"pretrain {cfg.preset}", show_progress=show_progress)
