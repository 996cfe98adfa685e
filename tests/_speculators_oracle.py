"""Runs vLLM's `speculators` DFlash model on a draft checkpoint, inside .venv-ref (torch).

    .venv-ref/bin/python tests/_speculators_oracle.py JOBS.json

JOBS.json is a list of jobs, each {"draft": dir, "verifier": dir, "inputs": npz, "out": npz,
"gammas": [float], "grad": bool, "convert_from": z-lab dir or null}. Inputs hold either
"features" [1, T, K*H] or a target hidden-state stack "stack" [L+1, T, H] (HF hidden_states,
0 = embedding output) from which the draft's aux layers are taken in speculators' convention. With convert_from, speculators' own z-lab
converter (DFlashConverter) first writes `draft` from that z-lab directory. The draft is loaded
with `DFlashDraftModel.from_pretrained` (eager attention, CPU, float32 unless stored otherwise),
its training forward runs on the given features and anchors (its random anchor draw replaced by
the given anchors), and its DFlash objective (`compute_metrics`, eager KL loss) is
back-propagated. The out npz holds the draft hidden states and logits, the loss and per-slot
accuracy counts, the gradient of every trainable parameter, and the config as speculators read it.
Nothing of speculators is reimplemented here: this file only feeds it and records what it says.
"""
import json
import sys

import numpy as np
import torch


def _config_readback(model) -> dict:
    cfg = model.config
    tl = cfg.transformer_layer_config
    rope = dict(getattr(tl, "rope_parameters", None) or {})
    return {
        "layer_types": list(getattr(tl, "layer_types", None) or []),
        "sliding_window": getattr(tl, "sliding_window", None),
        "rope_theta": rope.get("rope_theta"),
        "rope_parameters": {k: v for k, v in rope.items() if k != "rope_theta"},
        "attention_bias": bool(tl.attention_bias),
        "mask_token_id": model.mask_token_id,
        "aux_hidden_state_layer_ids": list(cfg.aux_hidden_state_layer_ids),
        "block_size": model.block_size,
        "num_target_layers": getattr(tl, "num_target_layers", None),
        "rms_norm_eps": float(tl.rms_norm_eps),
        "dtype": str(next(model.layers.parameters()).dtype).replace("torch.", ""),
        "sliding_window_non_causal": bool(cfg.sliding_window_non_causal),
    }


def run(job: dict) -> None:
    from speculators.losses import resolve_loss_config
    from speculators.models.dflash import DFlashDraftModel
    from speculators.models.dflash import core
    from speculators.models.dflash.metrics import compute_metrics

    if job.get("convert_from"):
        from speculators.convert.dflash import DFlashConverter

        DFlashConverter().convert(job["convert_from"], job["draft"], base_model=job["verifier"],
                                  validate=True)
    model = DFlashDraftModel.from_pretrained(job["draft"], attn_implementation="eager")
    model.config.transformer_layer_config._attn_implementation = "eager"
    model._create_mask_fn = core.create_float_mask  # the eager path's mask (core.py:82-88)
    model.load_verifier_weights()  # embedding, LM heads and verifier norm from the verifier dir
    x = dict(np.load(job["inputs"]))
    anchors = torch.from_numpy(x["anchors"].astype(np.int64))
    valid = torch.from_numpy(x["anchor_valid"].astype(bool))
    core.select_anchors = lambda loss_mask, n, block_size: (anchors, valid)

    dtype = next(model.layers.parameters()).dtype
    t = lambda a, dt=dtype: torch.from_numpy(np.asarray(a)).to(dt)  # noqa: E731
    feats = x.get("features")
    if feats is None:  # a target hidden-state stack [L+1, T, H], indexed by speculators' aux ids
        ids = model.config.aux_hidden_state_layer_ids
        feats = np.concatenate([x["stack"][i] for i in ids], axis=-1)[None]
    hidden, logits, targets, mask, _ = model._backbone_forward(
        t(feats), t(x["input_ids"], torch.long), t(x["loss_mask"], torch.long),
        t(x["verifier_last"]), torch.zeros_like(t(x["input_ids"], torch.long)),
        max_anchors=int(anchors.numel()))
    out = {"hidden": hidden.detach().float().numpy(), "logits": logits.detach().float().numpy(),
           "target_ids": targets.argmax(-1).numpy(), "aligned_mask": mask.numpy(),
           "config": json.dumps(_config_readback(model))}
    losses = []
    for gamma in job.get("gammas", [4.0]):
        loss, metrics = compute_metrics(logits, targets, mask, model.block_size, gamma=gamma,
                                        loss_config=resolve_loss_config("kl_div", "eager"))
        losses.append(loss)
    out["losses"] = np.array([l.item() for l in losses], np.float64)
    for pos in range(1, model.block_size):
        out[f"acc_sum_{pos}"] = metrics[f"position_{pos}_acc_sum"].numpy()
        out[f"acc_total_{pos}"] = metrics[f"position_{pos}_acc_total"].numpy()
    if job.get("grad"):  # gradient of the first gamma's loss
        losses[0].backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                out[f"grad/{name}"] = p.grad.numpy() if p.grad is not None else np.zeros(
                    p.shape, np.float32)
    np.savez(job["out"], **out)


if __name__ == "__main__":
    torch.manual_seed(0)
    for job in json.load(open(sys.argv[1])):
        run(job)
    print("ok")
