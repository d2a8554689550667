"""Parameter groups for weight decay: biases and normalisation weights are not decayed.

    opt = AdamW(param_groups_with_decay(model.named_parameters(), weight_decay=0.01), lr=2e-5)

A parameter is exempt when any of the ``no_decay`` patterns is a substring of
its name (the convention of BERT fine-tuning scripts).
"""
NO_DECAY = ("bias", "LayerNorm.weight", "norm")


def is_exempt(name: str, no_decay=NO_DECAY) -> bool:
    """The no-decay rule: some pattern of ``no_decay`` is a substring of the parameter's name.

    >>> is_exempt("encoder.layer.0.output.LayerNorm.weight"), is_exempt("encoder.layer.0.output.dense.weight")
    (True, False)
    """
    return any(pattern in name for pattern in no_decay)


def param_groups_with_decay(named_params, weight_decay: float, no_decay=NO_DECAY) -> list:
    """``[{"params": decayed, "weight_decay": λ}, {"params": exempt, "weight_decay": 0.0}]``.

    ``named_params``: an iterable of ``(name, parameter)``. Parameters with
    ``requires_grad=False`` (frozen) are left out of both groups.
    """
    decay, exempt = [], []
    for name, p in named_params:
        if p.requires_grad:
            (exempt if is_exempt(name, no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": exempt, "weight_decay": 0.0}]
