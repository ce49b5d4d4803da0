"""The paper's three test protocols on real photos: their views and how their scores
average (the protocols over a whole run, in one process and in two:
tests/training/test_faults.py)."""

import numpy as np
from photos import PHOTOS, photos_config

from resnet_jax.data import augment
from resnet_jax.data import pipeline as input_pipeline
from resnet_jax.evaluation import protocols


def test_ten_crop_gives_10_views_whose_centre_is_the_center_protocol_view():
    views = augment.ten_crop_views(PHOTOS[0])
    assert views.shape == (10, 224, 224, 3)
    np.testing.assert_array_equal(views[4], augment.center_view(PHOTOS[0]))
    np.testing.assert_array_equal(views[5:], views[:5, :, ::-1])
    resized = augment.resize_shorter_side(PHOTOS[0], 256)
    np.testing.assert_array_equal(views[0], resized[:224, :224])
    np.testing.assert_array_equal(views[3], resized[-224:, -224:])


def test_multiscale_averages_the_five_scales_and_flips(photos_dir):
    pipeline = input_pipeline.Pipeline(photos_config(photos_dir), seed=0)
    views_of = protocols.protocol_views(pipeline, 'multiscale')
    per_image = views_of(PHOTOS[0])
    assert [min(v.shape[1:3]) for v in per_image] == [224, 256, 384, 480, 640]
    assert all(v.shape[0] == 2 and v.shape[2] % 32 == 0 for v in per_image)
    np.testing.assert_array_equal(per_image[1][1], per_image[1][0][:, ::-1])

    def predict(x):  # a distinct score per view size: class 0 prob = h / 1000
        p0 = np.full(len(x), x.shape[1] / 1000.0)
        return np.stack([p0, 1 - p0], axis=1)

    scores = protocols.average_scores(predict, views_of, [PHOTOS[0], PHOTOS[1]], 2)
    expected = np.mean([v.shape[1] / 1000.0 for v in per_image])
    np.testing.assert_allclose(scores[:, 0], expected)


def test_center_protocol_of_small_images_is_the_image_itself(data_dir):
    cfg = photos_config(data_dir)
    cfg.name = 'digits'
    pipeline = input_pipeline.Pipeline(cfg, seed=0)
    image = pipeline.eval.image(0)
    (view,) = protocols.protocol_views(pipeline, 'center')(image)
    np.testing.assert_allclose(view[0], augment.normalize(image, pipeline.mean))
    ten = protocols.protocol_views(pipeline, 'ten_crop')(image)[0]
    assert ten.shape == (10, 32, 32, 3)
