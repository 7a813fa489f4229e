"""DIFT's DAVIS label propagation (pipeline.matching.label_propagation) against a transcription of DIFT's
own code, and on cases with a known answer.

The `dift_*` functions below are Tsingularity/dift @ 9421eb2, eval_davis.py, transcribed line for line
(`restrict_neighborhood`, `norm_mask`, `label_propagation`, `to_one_hot`, `read_seg`, the per-frame loop of
`eval_video_tracking_davis`), on the CPU: `.cuda()` dropped, `args.*` passed as parameters, and
`extract_feature` replaced by reading the given (h, w, c) feature maps (its `.view(h * w, dim)`), the
frames' PNG writing by yielding. benchmarks/label_propagation.py times them too.
"""

from __future__ import annotations

import copy
import queue

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.cache.encode import canvas_shape
from pipeline.matching.label_propagation import (PropagationSettings, first_labels, one_hot, propagate,
                                                  propagate_video, to_mask)

# DIFT's `np.array(frame_tar_seg.squeeze().cpu(), dtype=np.uint8)`, kept verbatim below, makes numpy 2 warn.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# ------------------------------------------------------------ DIFT (Tsingularity/dift @ 9421eb2, eval_davis.py)

def dift_restrict_neighborhood(h, w, size_mask_neighborhood):
    # We restrict the set of source nodes considered to a spatial neighborhood of the query node (i.e. ``local attention'')
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size_mask_neighborhood + 1):
                for q in range(2 * size_mask_neighborhood + 1):
                    if i - size_mask_neighborhood + p < 0 or i - size_mask_neighborhood + p >= h:
                        continue
                    if j - size_mask_neighborhood + q < 0 or j - size_mask_neighborhood + q >= w:
                        continue
                    mask[i, j, i - size_mask_neighborhood + p, j - size_mask_neighborhood + q] = 1

    mask = mask.reshape(h * w, h * w)
    return mask


def dift_norm_mask(mask):
    c, h, w = mask.size()
    for cnt in range(c):
        mask_cnt = mask[cnt, :, :]
        if (mask_cnt.max() > 0):
            mask_cnt = (mask_cnt - mask_cnt.min())
            mask_cnt = mask_cnt / mask_cnt.max()
            mask[cnt, :, :] = mask_cnt
    return mask


def dift_extract_feature(unet_ft, return_h_w=False):
    """extract_feature after the model: `unet_ft` is the (h, w, c) map its permute gives."""
    h, w, dim = unet_ft.shape
    unet_ft = torch.as_tensor(unet_ft).float().reshape(h * w, dim)  # hw,c
    if return_h_w:
        return unet_ft, h, w
    return unet_ft


def dift_label_propagation(temperature, topk, size_mask_neighborhood, frame_tar, list_frame_feats, list_segs,
                           mask_neighborhood=None):
    """
    propagate segs of frames in list_frames to frame_tar
    """
    ## we only need to extract feature of the target frame
    feat_tar, h, w = dift_extract_feature(frame_tar, return_h_w=True)

    return_feat_tar = feat_tar.T  # dim x h*w

    ncontext = len(list_frame_feats)
    feat_sources = torch.stack(list_frame_feats)  # nmb_context x dim x h*w

    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)

    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / temperature)  # nmb_context x h*w (tar: query) x h*w (source: keys)

    if size_mask_neighborhood > 0:
        if mask_neighborhood is None:
            mask_neighborhood = dift_restrict_neighborhood(h, w, size_mask_neighborhood)
            mask_neighborhood = mask_neighborhood.unsqueeze(0).repeat(ncontext, 1, 1)
        aff *= mask_neighborhood

    aff = aff.transpose(2, 1).reshape(-1, h * w)  # nmb_context*h*w (source: keys) x h*w (tar: queries)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0

    aff = aff / torch.sum(aff, keepdim=True, axis=0)

    list_segs = [s for s in list_segs]
    segs = torch.cat(list_segs)
    nmb_context, C, h, w = segs.shape
    segs = segs.reshape(nmb_context, C, -1).transpose(2, 1).reshape(-1, C).T  # C x nmb_context*h*w
    seg_tar = torch.mm(segs, aff)
    seg_tar = seg_tar.reshape(1, C, h, w)

    return seg_tar, return_feat_tar, mask_neighborhood


def dift_to_one_hot(y_tensor, n_dims=None):
    """
    Take integer y (tensor or variable) with n dims &
    convert it to 1-hot representation with n+1 dims.
    """
    if (n_dims is None):
        n_dims = int(y_tensor.max() + 1)
    _, h, w = y_tensor.size()
    y_tensor = y_tensor.type(torch.LongTensor).view(-1, 1)
    n_dims = n_dims if n_dims is not None else int(torch.max(y_tensor)) + 1
    y_one_hot = torch.zeros(y_tensor.size()[0], n_dims).scatter_(1, y_tensor, 1)
    y_one_hot = y_one_hot.view(h, w, n_dims)
    return y_one_hot.permute(2, 0, 1).unsqueeze(0)


def dift_read_seg(seg, scale_factor, scale_size=[480]):
    """read_seg from `seg = Image.open(seg_dir)` on."""
    _w, _h = seg.size  # note PIL.Image.Image's size is (w, h)
    if len(scale_size) == 1:
        if (_w > _h):
            _th = scale_size[0]
            _tw = (_th * _w) / _h
            _tw = int((_tw // 32) * 32)
        else:
            _tw = scale_size[0]
            _th = (_tw * _h) / _w
            _th = int((_th // 32) * 32)
    else:
        _th = scale_size[1]
        _tw = scale_size[0]
    small_seg = np.array(seg.resize((_tw // scale_factor, _th // scale_factor), 0))
    small_seg = torch.from_numpy(small_seg.copy()).contiguous().float().unsqueeze(0)

    return dift_to_one_hot(small_seg), np.asarray(seg)


@torch.no_grad()
def dift_track(features, first_seg, scale_factor, ori_h, ori_w, n_last_frames, temperature, topk,
               size_mask_neighborhood, mask_neighborhood=None):
    """eval_video_tracking_davis's loop over frames 1..N-1 of `features` (frames 0..N-1, each (h, w, c));
    yields (the (C, h, w) soft map queued, the (ori_h, ori_w) uint8 mask written). `mask_neighborhood`:
    the (1, hw, hw) mask DIFT builds at the first frame, when built beforehand (the benchmark times it)."""
    # The queue stores the n preceeding frames
    que = queue.Queue(n_last_frames)

    frames = iter(features)
    # extract first frame feature
    frame1_feat = dift_extract_feature(next(frames)).T  # dim x h*w

    for frame_tar in frames:  # for cnt in range(1, len(frame_list))
        # we use the first segmentation and the n previous ones
        used_frame_feats = [frame1_feat] + [pair[0] for pair in list(que.queue)]
        used_segs = [first_seg] + [pair[1] for pair in list(que.queue)]

        frame_tar_avg, feat_tar, mask_neighborhood = dift_label_propagation(
            temperature, topk, size_mask_neighborhood, frame_tar, used_frame_feats, used_segs, mask_neighborhood)

        # pop out oldest frame if neccessary
        if que.qsize() == n_last_frames:
            que.get()
        # push current results into queue
        seg = copy.deepcopy(frame_tar_avg)
        que.put([feat_tar, seg])

        yield seg[0], dift_mask(frame_tar_avg, scale_factor, ori_h, ori_w)


def dift_mask(frame_tar_avg, scale_factor, ori_h, ori_w):
    """The loop's last steps (`# upsampling & argmax`, `# saving to disk` but the writing) on a (1, C, h, w) map."""
    # upsampling & argmax
    frame_tar_avg = F.interpolate(frame_tar_avg, scale_factor=scale_factor, mode='bilinear', align_corners=False,
                                  recompute_scale_factor=False)[0]
    frame_tar_avg = dift_norm_mask(frame_tar_avg)
    _, frame_tar_seg = torch.max(frame_tar_avg, dim=0)

    # saving to disk
    frame_tar_seg = np.array(frame_tar_seg.squeeze().cpu(), dtype=np.uint8)
    frame_tar_seg = np.array(Image.fromarray(frame_tar_seg).resize((ori_w, ori_h), 0))
    return frame_tar_seg


# ------------------------------------------------------------------------------------------- helpers

GRID = (9, 13)  # (h, w): not square, so a transposed grid fails
STRIDE = 32  # a canvas of 13 x 32 by 9 x 32 = 416 x 288, DIFT's read_seg canvas for a 75 x 50 frame at scale_size [288]
ORIGINAL = (75, 50)  # (W, H)
SHORT_SIDE = 288


def random_features(frames: int, grid=GRID, channels=16, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*grid, channels, generator=generator) for _ in range(frames)]


def annotation(objects: int = 3, size=ORIGINAL) -> np.ndarray:
    """An (H, W) annotation of `objects` blocks large enough to survive downsampling to GRID."""
    width, height = size
    seg = np.zeros((height, width), np.uint8)
    seg[5:30, 4:30] = 1
    seg[20:48, 35:60] = 2
    if objects >= 3:
        seg[2:18, 50:73] = 3
    return seg


def ours(features, settings: PropagationSettings, seg: np.ndarray, objects: int) -> tuple[list, list]:
    first = one_hot(first_labels(seg, GRID), objects)
    soft = [s.clone() for s in propagate(first, features, settings)]
    return soft, [to_mask(s, STRIDE, ORIGINAL) for s in soft]


def theirs(features, settings: PropagationSettings, seg: np.ndarray) -> tuple[list, list]:
    first_seg, _ = dift_read_seg(Image.fromarray(seg), STRIDE, [SHORT_SIDE])
    out = list(dift_track(features, first_seg, STRIDE, ORIGINAL[1], ORIGINAL[0], settings.context,
                          settings.temperature, settings.topk, settings.neighborhood))
    return [s for s, _ in out], [m for _, m in out]


def assert_same(a: tuple[list, list], b: tuple[list, list]):
    (soft_a, masks_a), (soft_b, masks_b) = a, b
    assert len(soft_a) == len(soft_b)
    for frame, (x, y, m, n) in enumerate(zip(soft_a, soft_b, masks_a, masks_b), start=1):
        assert x.shape == y.shape, frame
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"frame {frame}")
        assert m.shape == n.shape == (ORIGINAL[1], ORIGINAL[0])
        assert np.array_equal(m, n), f"frame {frame}: {(m != n).sum()} pixels differ"


# ----------------------------------------------------------------------------------- against DIFT

@pytest.mark.parametrize("settings", [
    # the queue wraps (4 frames queued of 11 propagated), the window clipped at every border
    PropagationSettings(temperature=0.2, topk=5, neighborhood=3, context=4),
    # windows that cover the grid, and no window at all (DIFT skips its mask at size 0)
    PropagationSettings(temperature=0.1, topk=15, neighborhood=20, context=3),
    PropagationSettings(temperature=0.2, topk=7, neighborhood=0, context=2),
    # topk above a corner query's window (2 x 2 cells a frame): DIFT's k-th largest is then a zero from
    # outside the window and every window value is kept (frames 1-2: 4 and 8 candidates; then 12 > 10)
    PropagationSettings(temperature=0.2, topk=10, neighborhood=1, context=2),
], ids=["wrapping-queue", "window-covers-grid", "no-window", "topk-beyond-corner-window"])
def test_matches_dift(settings):
    features = random_features(12)
    seg = annotation()
    assert canvas_shape(*ORIGINAL, SHORT_SIDE, "short-side") == (GRID[1] * STRIDE, GRID[0] * STRIDE)
    expected = theirs(features, settings, seg)
    assert_same(ours(features, settings, seg, 3), expected)
    # and the convenience: annotation and features in, masks out
    masks = list(propagate_video(seg, iter(features), STRIDE, settings))
    assert all(np.array_equal(m, n) for m, n in zip(masks, expected[1], strict=True))


def test_ties_are_kept_as_dift_keeps_them():
    """One-hot features: every cosine is exactly 0 or 1, so the k-th value is tied with many others; DIFT
    keeps them all (values below the k-th are dropped, equal ones stay)."""
    generator = torch.Generator().manual_seed(3)
    features = [F.one_hot(torch.randint(0, 4, GRID, generator=generator), 4).float() for _ in range(8)]
    settings = PropagationSettings(temperature=0.2, topk=5, neighborhood=2, context=3)
    seg = annotation()
    assert_same(ours(features, settings, seg, 3), theirs(features, settings, seg))


def test_an_object_lost_in_downsampling_leaves_the_masks_alone():
    """DIFT makes max(label) + 1 channels from the downsampled annotation; `objects` more than that adds
    channels of zeros, which change no mask."""
    seg = annotation(objects=2)
    features = random_features(6, seed=1)
    settings = PropagationSettings(topk=5, neighborhood=3, context=2)
    (soft, masks), (_, expected) = ours(features, settings, seg, 4), theirs(features, settings, seg)
    assert soft[0].shape[0] == 5 and not soft[-1][3:].any()
    assert all(np.array_equal(m, n) for m, n in zip(masks, expected, strict=True))


def test_topk_beyond_every_candidate_is_refused_as_dift_fails():
    features = random_features(3, grid=(2, 3))
    first = one_hot(np.array([[0, 1, 1], [0, 0, 1]]), 1)
    with pytest.raises(RuntimeError):
        list(dift_track(features, first[None], 4, 8, 12, 2, 0.2, 7, 1))
    with pytest.raises(PipelineError, match="topk"):
        list(propagate(first, features, PropagationSettings(topk=7, neighborhood=1, context=2)))


# ---------------------------------------------------------------------------------- known answers

def moving_scene(shuffle: bool, frames=8, grid=(24, 32), shift=(1, 1), channels=32, seed=0):
    """Features that move with the content: frame t shows content cell u at cell u + t * shift, each content
    cell a random vector. Frame 0 has two objects; returns (features, frame 0 labels, the expected labels of
    frame t at cells whose content frame 0 showed (-1 elsewhere))."""
    rng = np.random.default_rng(seed)
    h, w = grid
    pad_y, pad_x = frames * shift[0], frames * shift[1]
    content = rng.standard_normal((h + pad_y, w + pad_x, channels)).astype(np.float32)  # content u at [u + pad]
    labels = np.zeros(grid, np.uint8)
    labels[6:12, 4:11] = 1
    labels[3:9, 15:22] = 2
    features, expected = [], []
    for t in range(frames):
        y0, x0 = pad_y - t * shift[0], pad_x - t * shift[1]
        frame = content[y0:y0 + h, x0:x0 + w].copy()
        if shuffle and t:
            frame = frame.reshape(h * w, channels)[rng.permutation(h * w)].reshape(h, w, channels)
        features.append(frame)
        known = np.full(grid, -1)
        dy, dx = t * shift[0], t * shift[1]
        known[dy:, dx:] = labels[:h - dy, :w - dx]
        expected.append(known)
    return features, labels, expected


def test_masks_follow_features_that_move():
    features, labels, expected = moving_scene(shuffle=False)
    settings = PropagationSettings(temperature=0.2, topk=3, neighborhood=3, context=2)
    predicted = [s.argmax(0).numpy() for s in propagate(one_hot(labels, 2), features, settings)]
    for t, p in enumerate(predicted, start=1):
        known = expected[t] >= 0
        assert known.sum() > 0.5 * known.size
        assert np.array_equal(p[known], expected[t][known]), f"frame {t}"
        assert (expected[t] > 0).sum() == (labels > 0).sum()  # the objects stayed in view: a real test


def test_masks_do_not_follow_shuffled_features():
    features, labels, expected = moving_scene(shuffle=True)
    settings = PropagationSettings(temperature=0.2, topk=3, neighborhood=3, context=2)
    predicted = [s.argmax(0).numpy() for s in propagate(one_hot(labels, 2), features, settings)]
    last, truth = predicted[-1], expected[-1]
    for obj in (1, 2):
        iou = ((last == obj) & (truth == obj)).sum() / ((last == obj) | (truth == obj)).sum()
        assert iou < 0.3, (obj, iou)


def test_streams_frames():
    """Each frame's features are read when its labels are due, not before."""
    read = []

    def frames():
        for t, f in enumerate(random_features(6)):
            read.append(t)
            yield f.numpy().astype(np.float16)

    first = one_hot(first_labels(annotation(), GRID), 3)
    for t, soft in enumerate(propagate(first, frames(), PropagationSettings(topk=5, neighborhood=3, context=2)), 1):
        assert read[-1] == t and soft.shape == (4, *GRID) and soft.dtype == torch.float32


def test_first_labels_pil_nearest_in_h_w_order():
    seg = np.arange(35, dtype=np.uint8).reshape(5, 7)  # (H, W) = (5, 7)
    assert np.array_equal(first_labels(seg, (2, 3)), [[8, 10, 12], [22, 24, 26]])
    assert first_labels(seg, (3, 2)).shape == (3, 2)
    # DIFT's read_seg on the module's asymmetric annotation, its grid (9, 13)
    seg = annotation()
    small, _ = dift_read_seg(Image.fromarray(seg), STRIDE, [SHORT_SIDE])
    assert torch.equal(one_hot(first_labels(seg, GRID), 3), small[0])


def test_to_mask_is_h_by_w_of_the_original():
    soft = torch.rand(3, 5, 7)
    mask = to_mask(soft, 4, (50, 30))
    assert mask.shape == (30, 50) and mask.dtype == np.uint8 and mask.max() <= 2
    assert np.array_equal(mask, dift_mask(soft[None].clone(), 4, 30, 50))


def test_settings_are_checked():
    for field, value in [("context", 0), ("topk", 0), ("temperature", 0.0), ("neighborhood", -1)]:
        with pytest.raises(PipelineError, match=field):
            PropagationSettings(**{field: value})
    with pytest.raises(PipelineError, match="first"):
        list(propagate(torch.zeros(2, 4, 4), random_features(2)))
