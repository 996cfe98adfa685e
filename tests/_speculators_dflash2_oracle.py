"""Runs `speculators` 0.9.0's DFlash2 model (models/dflash2) on a draft, inside .venv-ref.

    .venv-ref/bin/python tests/_speculators_dflash2_oracle.py JOBS.json

Each job {"draft", "verifier", "inputs", "out", "gamma", "alpha", "resave"}: the draft (our
speculators-format export) is loaded with DFlash2DraftModel.from_pretrained (eager attention,
CPU, float32) with its loading info recorded, its verifier tensors loaded, its anchor draw
replaced by the given anchors, and its own training forward (`forward`: backbone, unary top-K,
selector_training_candidates, score_candidates, compute_metrics with the eager KL loss) run and
back-propagated. The out npz holds the backbone's hidden states and logits, the loss, the
metrics, every trainable parameter's gradient and the loading info; the model is then saved
again with its own save_pretrained to `resave`. Nothing of speculators is reimplemented here.
"""
import json
import sys

import numpy as np
import torch


def run(job: dict) -> None:
    from speculators.losses import resolve_loss_config
    from speculators.models.dflash import core
    from speculators.models.dflash2 import DFlash2DraftModel

    model, info = DFlash2DraftModel.from_pretrained(job["draft"], attn_implementation="eager",
                                                    output_loading_info=True)
    model.config.transformer_layer_config._attn_implementation = "eager"
    model._create_mask_fn = core.create_float_mask  # the eager path's mask
    model.load_verifier_weights()
    x = dict(np.load(job["inputs"]))
    anchors = torch.from_numpy(x["anchors"].astype(np.int64))
    valid = torch.from_numpy(x["anchor_valid"].astype(bool))
    core.select_anchors = lambda loss_mask, n, block_size: (anchors, valid)

    t = lambda a, dt=torch.float32: torch.from_numpy(np.asarray(a)).to(dt)  # noqa: E731
    args = (t(x["features"]), t(x["input_ids"], torch.long), t(x["loss_mask"], torch.long),
            t(x["verifier_last"]), torch.zeros_like(t(x["input_ids"], torch.long)))
    with torch.no_grad():
        hidden, logits, _, mask, _ = model._backbone_forward(*args,
                                                              max_anchors=int(anchors.numel()))
    tv = resolve_loss_config("tv", "eager")["tv"][0]  # get_trainer_kwargs' way, eager on CPU
    _, loss, metrics = model(*args, loss_config=resolve_loss_config("kl_div", "eager"),
                             tv_loss_fn=tv,
                             gamma=job["gamma"], selector_loss_alpha=job["alpha"],
                             max_anchors=int(anchors.numel()))
    loss.backward()
    out = {"hidden": hidden.numpy(), "logits": logits.numpy(), "aligned_mask": mask.numpy(),
           "loss": np.float64(loss.item()),
           "info": json.dumps({k: sorted(map(str, v)) for k, v in info.items()}),
           "fields": json.dumps({k: getattr(model.config, k) for k in (
               "conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")})}
    for k, v in metrics.items():
        out[f"metric/{k}"] = np.asarray(v.detach().float().numpy(), np.float64)
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[f"grad/{name}"] = (p.grad.numpy() if p.grad is not None
                                   else np.zeros(p.shape, np.float32))
    model.save_pretrained(job["resave"])
    np.savez(job["out"], **out)


if __name__ == "__main__":
    torch.manual_seed(0)
    for job in json.load(open(sys.argv[1])):
        run(job)
    print("ok")
