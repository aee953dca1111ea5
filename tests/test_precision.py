import torch

from userllm.precision import autocast


def test_autocast_runs_linear_layers_in_bf16_only_when_asked():
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with autocast(True):
        assert layer(x).dtype == torch.bfloat16
    with autocast(False, "cpu"):
        assert layer(x).dtype == torch.float32
    amp = autocast(True, "cpu:0")  # a device index is dropped: autocast takes the device type
    assert amp.device == "cpu"
    for _ in range(2):  # entered again after it exits, as scoring does batch by batch
        with amp:
            assert layer(x).dtype == torch.bfloat16
        assert layer(x).dtype == torch.float32
