import random

import numpy as np
import torch

from gemminer.data import Batches, load_dataset
from gemminer.models import build_model
from gemminer.train import evaluate, masked_accuracy, recalibrate_batchnorm


def test_mnist1d_canonical_split_and_global_rng_untouched(tmp_path):
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    data = load_dataset("mnist1d", str(tmp_path))
    assert (random.random(), np.random.rand()) == expected
    assert len(data.train) == 4000 and len(data.test) == 1000
    assert data.input_shape == (1, 40) and data.train.x.dtype == torch.float32
    assert set(data.train.y.tolist()) == set(range(10))
    cached = load_dataset("mnist1d", str(tmp_path))  # from the .npz cache
    assert torch.equal(cached.train.x, data.train.x) and torch.equal(cached.test.y, data.test.y)


def test_batches_cover_every_sample_once(tiny):
    batches = Batches(tiny.train, 64, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([y for _, y in batches])
    assert len(seen) == len(tiny.train) and len(batches) == (len(tiny.train) + 63) // 64
    assert torch.equal(seen.sort().values, tiny.train.y.sort().values)


def test_bn_recalibration_changes_fresh_model_accuracy(tiny, batches):
    torch.manual_seed(0)
    model = build_model("cnn1d", tiny.input_shape, 10, width=8)
    test = Batches(tiny.test, 100)
    fresh = evaluate(model, test).accuracy
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    recalibrated = masked_accuracy(model, masks, test, batches, recalibration_batches=5)
    assert fresh != recalibrated
    recalibrate_batchnorm(model, batches, 5)
    assert model[1].num_batches_tracked.item() == 5 and model[1].momentum == 0.1


def test_dense_training_beats_chance(tiny, device_batches, device):
    from gemminer.config import FinetuneConfig
    from gemminer.finetune import finetune

    torch.manual_seed(0)
    model = build_model("cnn1d", tiny.input_shape, 10, width=16).to(device)
    history = finetune(model, device_batches, Batches(tiny.test.to(device), 100), epochs=8,
                       config=FinetuneConfig(lr=0.05, lr_schedule="cosine"))
    assert history[-1]["test_acc"] > 0.3  # chance is 0.1


def test_batches_resume_mid_pass_exactly_with_augmentation():
    from gemminer.data import TensorData
    from gemminer.transforms import ImageTransform

    images = TensorData(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40))

    def stream():
        augment = ImageTransform((0.5,) * 3, (0.25,) * 3, crop_padding=1, flip=True,
                                 generator=torch.Generator().manual_seed(7))
        return Batches(images, 6, shuffle=True, generator=torch.Generator().manual_seed(3), transform=augment)

    reference = stream()
    expected = [batch for _ in range(2) for batch in reference]  # two passes
    interrupted = stream()
    first_pass = iter(interrupted)
    seen = [next(first_pass) for _ in range(3)]
    state = interrupted.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    seen += list(resumed) + list(resumed)
    assert len(seen) == len(expected)
    for (x, y), (x_ref, y_ref) in zip(seen, expected, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
