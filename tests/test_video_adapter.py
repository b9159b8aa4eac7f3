"""The video adapter (issue 11): its schedule and the paper's parameter budgets, the temporal aggregator's shapes and
its use of time, and its composition with the image model (identity at zero gates, skipped without a clip, a mixed
batch equal to its samples alone)."""

import pytest
import torch

from adapters.cross_attention import CrossAttentionConfig
from adapters.video import TemporalAggregator, VideoAdapterConfig, video_schedule
from conftest import randomize_
from encoders.image_transform import Images
from encoders.video import Videos
from encoders.vision import VisionConfig
from mm_llama.errors import ConfigError, InputError
from mm_llama.llama import LlamaConfig
from mm_llama.media import Media
from mm_llama.model import MMConfig, MMLlama

VOCAB = 300
IMG, VID = VOCAB, VOCAB + 1  # the first two media rows
TRUNK = LlamaConfig.preset("debug", vocab_size=VOCAB, n_layers=4)
VISION = VisionConfig.preset("debug", max_tiles=1)  # 28-px tiles of 2 x 2 patches: 5 tokens per frame


def test_video_blocks_sit_before_every_fourth_image_block_from_the_top():
    assert video_schedule([3, 7, 11, 15, 19, 23, 27, 31], 4) == [15, 31]  # 8B layout: 2 video blocks
    assert video_schedule(list(range(3, 80, 4)), 4) == [15, 31, 47, 63, 79]  # 70B: 5
    assert video_schedule([1, 3, 5], 4) == [5]  # the demo's 3 image blocks: one video block, with the last
    assert video_schedule([1, 3], 1) == [1, 3]


@pytest.mark.parametrize(("trunk", "n_image_blocks", "paper"), [("8B", 8, 0.6e9), ("70B", 20, 4.6e9)])
def test_the_paper_layouts_have_the_papers_parameter_budget(trunk, n_image_blocks, paper):
    # Paper §7.2: aggregator + video cross-attention are 0.6B for the 8B model and 4.6B for 70B.
    config = MMConfig(trunk=LlamaConfig.preset(trunk), vision=VisionConfig.preset("3.2-11B"),
                      image_adapter=CrossAttentionConfig(n_layers=n_image_blocks), video_adapter=VideoAdapterConfig())
    with torch.device("meta"):
        adapter = MMLlama(config).video_adapter
    n = sum(p.numel() for p in adapter.parameters())
    assert abs(n / paper - 1) < 0.05, n
    assert adapter.aggregator.n_latents == 4 * 1601  # one frame's tokens: 4 tiles of 40 x 40 patches + class token


def test_config_is_checked():
    with pytest.raises(ConfigError, match="multiple of group"):
        VideoAdapterConfig(n_frames=24, group=16)
    with pytest.raises(ConfigError, match="n_latents must be a positive integer"):
        VideoAdapterConfig(n_latents=0)
    with pytest.raises(ConfigError, match="gate_init must be a finite number"):
        VideoAdapterConfig(gate_init=float("inf"))
    with pytest.raises(ConfigError, match="needs 'vision' and 'image_adapter'"):
        MMConfig(trunk=TRUNK, video_adapter=VideoAdapterConfig())


@pytest.mark.parametrize(("n_frames", "group"), [(16, 16), (32, 16), (64, 32)])
def test_aggregator_shapes(n_frames, group):
    aggregator = TemporalAggregator(TRUNK, VideoAdapterConfig(n_frames=n_frames, group=group), tokens_per_frame=5)
    out = aggregator(torch.randn(3, n_frames, 5, TRUNK.dim))
    assert out.shape == (3, n_frames // group, 5, TRUNK.dim) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiple of"):
        aggregator(torch.randn(1, n_frames + 1, 5, TRUNK.dim))


def test_the_order_of_frames_matters_through_the_time_embeddings():
    torch.manual_seed(0)
    aggregator = randomize_(TemporalAggregator(TRUNK, VideoAdapterConfig(n_frames=8, group=4), tokens_per_frame=5))
    frames = torch.randn(2, 8, 5, TRUNK.dim)
    within = frames[:, [1, 0, 3, 2, 5, 4, 7, 6]]  # frames swapped inside each group
    across = frames[:, [4, 5, 6, 7, 0, 1, 2, 3]]  # the two groups swapped
    with torch.no_grad():
        out = aggregator(frames)
        assert (aggregator(within) - out).abs().max() > 1e-2
        assert (aggregator(across) - out).abs().max() > 1e-2
        # The mechanism: without the per-frame time embedding a group is a set (attention is order-free) ...
        aggregator.time_embedding.zero_()
        assert torch.allclose(aggregator(within), aggregator(frames), atol=1e-5)
        # ... and the effective frames differ only by their per-group embedding.
        aggregator.frame_embedding.zero_()
        assert torch.allclose(aggregator(across), aggregator(frames).flip(1), atol=1e-5)


def models(seed=0, video_gate=0.0, read_moments=False, change_frame=False):
    """A video model with random weights (video gates at `video_gate`) and the same image model without it."""
    torch.manual_seed(seed)
    config = MMConfig(trunk=TRUNK, vision=VISION, image_adapter=CrossAttentionConfig(n_layers=2),
                      video_adapter=VideoAdapterConfig(n_frames=4, group=2, read_moments=read_moments,
                                                       change_frame=change_frame))
    video = randomize_(MMLlama(config), seed).eval()
    for block in video.video_adapter.cross_attention_layers:
        block.gate_attn.data.fill_(video_gate)
        block.gate_ffwd.data.fill_(video_gate)
    image = MMLlama(MMConfig(trunk=TRUNK, vision=VISION, image_adapter=CrossAttentionConfig(n_layers=2))).eval()
    missing, unexpected = image.load_state_dict(video.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("video_adapter.") for k in unexpected)
    return video, image


def media(n_images, n_videos, seed=0):
    """Random tiled pictures and 4-frame clips: sample b has n_images[b] pictures and n_videos[b] clips."""
    g = torch.Generator().manual_seed(seed)
    B, n_img, n_vid = len(n_images), max(n_images), max(n_videos)
    images = Images(torch.randn(B, n_img, 1, 3, 28, 28, generator=g),
                    torch.tensor([[int(i < n) for i in range(n_img)] for n in n_images]),
                    torch.tensor([[[i < n] for i in range(n_img)] for n in n_images]), list(n_images))
    videos = Videos(torch.randn(B, n_vid, 4, 1, 3, 28, 28, generator=g),
                    torch.tensor([[int(v < n) for v in range(n_vid)] for n in n_videos]),
                    torch.tensor([[[v < n] for v in range(n_vid)] for n in n_videos]), list(n_videos))
    return images, videos


@pytest.mark.parametrize("read_moments", [False, True])
def test_zero_video_gates_give_the_image_models_logits_exactly(read_moments):
    video, image = models(read_moments=read_moments)
    tokens = torch.tensor([[5, IMG, 7, 8, 9, VID, 11, 12, 13, 14]])
    images, videos = media([1], [1])
    with torch.no_grad():
        with_video = video(tokens, Media(images=images, videos=videos))
        assert torch.equal(with_video, image(tokens, Media(images=images)))
        for block in video.video_adapter.cross_attention_layers:
            block.gate_attn.data.fill_(0.5)
        opened = video(tokens, Media(images=images, videos=videos))
    assert torch.equal(opened[:, :5], with_video[:, :5])  # text before <|video|> never sees the clip
    assert (opened[:, 5:] - with_video[:, 5:]).abs().amax(-1).min() > 1e-3  # every position after it does


def test_without_a_clip_the_video_blocks_do_not_run():
    video, image = models(video_gate=0.5)
    calls = []
    for block in video.video_adapter.cross_attention_layers:
        block.register_forward_hook(lambda *_: calls.append(1))
    video.video_adapter.aggregator.register_forward_hook(lambda *_: calls.append(1))
    images, no_clips = media([1, 1], [0, 0])
    tokens = torch.tensor([[5, IMG, 7, 8], [IMG, 6, 7, 8]])
    text = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        assert torch.equal(video(text), image(text))  # text only
        assert torch.equal(video(tokens, Media(images=images)), image(tokens, Media(images=images)))
        assert torch.equal(video(tokens, Media(images=images, videos=no_clips)), image(tokens, Media(images=images)))
    assert calls == []


@pytest.mark.parametrize(("read_moments", "change_frame"), [(False, False), (True, False), (True, True)])
def test_a_mixed_batch_answers_as_its_samples_alone(read_moments, change_frame):
    # Picture only, clip only, both, text only: each row's logits as if it were alone in the batch.
    video, _ = models(video_gate=0.5, read_moments=read_moments, change_frame=change_frame)
    tokens = torch.tensor([[IMG, 6, 7, 8, 9, 10], [VID, 6, 7, 8, 9, 10], [IMG, 6, 7, VID, 9, 10],
                           [5, 6, 7, 8, 9, 10]])
    n_images, n_videos = [1, 0, 1, 0], [0, 1, 1, 0]
    images, videos = media(n_images, n_videos)
    with torch.no_grad():
        batched = video(tokens, Media(images=images, videos=videos))
        for b in range(4):
            one_images = Images(images.pixel_values[b:b + 1], images.aspect_ratio_ids[b:b + 1],
                                images.tile_mask[b:b + 1], n_images[b:b + 1]) if n_images[b] else None
            one_videos = Videos(videos.pixel_values[b:b + 1], videos.aspect_ratio_ids[b:b + 1],
                                videos.tile_mask[b:b + 1], n_videos[b:b + 1]) if n_videos[b] else None
            alone = video(tokens[b:b + 1], Media(images=one_images, videos=one_videos))
            assert torch.allclose(batched[b:b + 1], alone, atol=1e-5), b


def test_a_video_model_round_trips_through_our_format_only(tmp_path):
    from mm_llama.checkpoints import save_mmllama
    from mm_llama.errors import CheckpointError

    video, _ = models(video_gate=0.5)
    save_mmllama(video, tmp_path / "ours")
    back = MMLlama.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert back.config.video_adapter == video.config.video_adapter
    state = back.state_dict()
    assert all(torch.equal(state[k], v) for k, v in video.state_dict().items())
    for fmt in ("meta", "hf"):
        with pytest.raises(CheckpointError, match="no video adapter"):
            save_mmllama(video, tmp_path / fmt, fmt=fmt)


def test_a_clip_for_a_model_without_video_is_a_clear_error():
    _, image = models()
    images, videos = media([1], [1])
    with pytest.raises(InputError, match="no video adapter"):
        image(torch.tensor([[IMG, 5, VID, 6]]), Media(images=images, videos=videos))


def test_latents_from_frames_start_as_each_groups_mean_frame():
    torch.manual_seed(0)
    aggregator = randomize_(TemporalAggregator(TRUNK, VideoAdapterConfig(n_frames=8, group=4), tokens_per_frame=5))
    frames = torch.randn(2, 8, 5, TRUNK.dim)
    with torch.no_grad():
        moved = aggregator(frames)
        # What the perceiver adds to the start (its layers' outputs, the learned offset, the group embedding) set
        # to zero: the effective frames are exactly the groups' mean frames, in the frame tokens' scale (no norm).
        for layer in aggregator.layers:
            layer.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        aggregator.latents.zero_()
        aggregator.frame_embedding.zero_()
        start = aggregator(frames)
    assert torch.equal(start, frames.view(2, 2, 4, 5, TRUNK.dim).mean(dim=2))
    assert (moved - start).abs().max() > 1e-2  # the perceiver does move them
    learned = TemporalAggregator(TRUNK, VideoAdapterConfig(n_frames=8, group=4, latents_from_frames=False),
                                 tokens_per_frame=5)
    assert learned.norm is not None and aggregator.norm is None
    with pytest.raises(ConfigError, match="latents_from_frames needs n_latents = one frame's tokens"):
        TemporalAggregator(TRUNK, VideoAdapterConfig(n_latents=7), tokens_per_frame=5)
    with pytest.raises(ConfigError, match="latents_from_frames must be true or false"):
        VideoAdapterConfig(latents_from_frames="yes")


def test_reading_moments_is_one_read_per_moment_mixed_per_channel():
    from adapters.cross_attention import CrossAttention
    from adapters.video import MomentCrossAttention

    torch.manual_seed(0)
    E, Q, V, T = 3, 5, 2, 6
    moments = randomize_(MomentCrossAttention(TRUNK, n_moments=E, tokens_per_moment=Q))
    plain = CrossAttention(TRUNK)
    plain.load_state_dict({k: v for k, v in moments.state_dict().items() if k != "moment_mix"})
    x, media = torch.randn(2, T, TRUNK.dim), torch.randn(2, V * E * Q, TRUNK.dim)
    mask = torch.zeros(2, 1, T, V, E, Q, dtype=torch.bool)
    mask[0, :, :, 0] = True  # sample 0's text sees clip 0, sample 1's clip 1 (as video_inputs' masks would)
    mask[1, :, :, 1] = True
    flat = mask.flatten(3)
    with torch.no_grad():
        got = moments(x, moments.kv(media), flat)
        # By hand: the ordinary attention on each moment's tokens alone, its output before wo mixed per channel.
        wo, plain.wo = plain.wo, torch.nn.Identity()
        reads = []
        for e in range(E):
            keep = torch.zeros(V, E, Q, dtype=torch.bool)
            keep[:, e] = True
            keep = keep.flatten()
            reads.append(plain(x, plain.kv(media[:, keep]), flat[..., keep]))
        expected = wo(sum(r * moments.moment_mix[e] for e, r in enumerate(reads)))
        assert torch.allclose(got, expected, atol=1e-5)
        # Equal weights: the moments' order does not matter; learned per-moment weights make it matter.
        moments.moment_mix.fill_(1 / E)
        order = torch.arange(V * E * Q).view(V, E, Q)[:, [2, 0, 1]].flatten()
        same = moments(x, moments.kv(media[:, order]), flat[..., order])
        assert torch.allclose(same, moments(x, moments.kv(media), flat), atol=1e-5)
        moments.moment_mix[0].mul_(3)
        assert (moments(x, moments.kv(media[:, order]), flat[..., order]) - moments(x, moments.kv(media), flat)
                ).abs().max() > 1e-3
        # No mask (every token visible: the decode step when the last row sees everything) works too.
        assert moments(x, moments.kv(media), None).shape == (2, T, TRUNK.dim)


def test_the_change_frame_is_the_last_moment_minus_the_first():
    torch.manual_seed(0)
    config = VideoAdapterConfig(n_frames=8, group=2, change_frame=True)
    assert (config.n_effective_frames, config.n_moments) == (4, 5)
    aggregator = randomize_(TemporalAggregator(TRUNK, config, tokens_per_frame=5))
    with torch.no_grad():
        out = aggregator(torch.randn(3, 8, 5, TRUNK.dim))
    assert out.shape == (3, 5, 5, TRUNK.dim)
    assert torch.allclose(out[:, 4], out[:, 3] - out[:, 0] + aggregator.change_embedding, atol=1e-6)
    video, _ = models(video_gate=0.5, change_frame=True)  # the video blocks read 2 + 1 moments of each clip
    tokens = torch.tensor([[VID, 6, 7, 8]])
    _, videos = media([0], [1])
    with torch.no_grad():
        assert torch.isfinite(video(tokens, Media(videos=videos))).all()
