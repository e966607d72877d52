"""attacks.text: encoding from embeddings equals encoding from ids, its gradient is right, projection is real."""
import pytest
import torch

from attacks import text
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(text_config=TINY_TEXT)


def test_encode_from_embeddings_equals_encode_from_ids(encoder):
    ids = text.tokenize(encoder, ["a painting of a red star", "a blue heart on the grass, by night"])
    from_ids = text.encode_ids(encoder, ids)
    assert torch.equal(text.encode_embeddings(encoder, text.embed_ids(encoder, ids)), from_ids)
    assert torch.equal(from_ids, encoder.encode(["a painting of a red star", "a blue heart on the grass, by night"]))


def test_encoding_is_causal_and_depends_on_the_embeddings(encoder):
    """Changing token 3's embedding leaves positions 0..2 unchanged and moves every later one (causal mask)."""
    emb = text.embed_ids(encoder, text.tokenize(encoder, "a red star"))
    moved = emb.clone()
    moved[0, 3] += 1.0
    a, b = text.encode_embeddings(encoder, emb), text.encode_embeddings(encoder, moved)
    assert torch.equal(a[0, :3], b[0, :3])
    assert (a[0, 3:] - b[0, 3:]).abs().amax(dim=-1).min() > 0


def test_gradient_wrt_embeddings_matches_finite_differences(encoder):
    """float64: d/d(emb) of a scalar of the encoding, against central differences on 6 random coordinates.
    (sdpa, the encoder's default: transformers' eager attention takes its softmax in float32.)"""
    enc = FrozenCLIPEmbedder(text_config=TINY_TEXT)
    enc.load_state_dict(encoder.state_dict())
    enc = enc.double()
    template = text.prefix_template(enc, "a red star", k=2)
    fixed = template.fixed_embeddings(enc)
    adv = torch.randn(1, 2, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 77, 32, dtype=torch.float64)

    def f(a):
        return (text.encode_embeddings(enc, template.embeddings(fixed, a)) * weight).sum()

    (grad,) = torch.autograd.grad(f(adv), adv)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        i, j = int(torch.randint(2, (1,), generator=g)), int(torch.randint(32, (1,), generator=g))
        h = torch.zeros_like(adv)
        h[0, i, j] = 1e-6
        with torch.no_grad():
            fd = (f(adv + h) - f(adv - h)) / 2e-6
        assert abs(fd.item() - grad[0, i, j].item()) <= 1e-6 * max(1.0, abs(fd.item())), (i, j)


def test_projection_returns_real_vocabulary_tokens(encoder):
    matrix = text.token_embedding_matrix(encoder)
    ids = torch.tensor([encoder.tokenizer.encode("a red star"), [49406, 4160, 49407]])
    emb = text.embed_ids(encoder, ids)
    for metric in ("cosine", "l2"):
        assert torch.equal(text.project_nearest(emb, matrix, metric), ids)  # a token is its own nearest
    # a perturbed embedding lands on a real id whose row is the nearest by cosine, and decodes to text
    noisy = emb + 0.3 * emb.std() * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    got = text.project_nearest(noisy, matrix)
    assert got.dtype == torch.long and got.shape == (2, 3) and int(got.min()) >= 0 and int(got.max()) < len(matrix)
    cos = torch.nn.functional.normalize(noisy[0, 1], dim=-1) @ torch.nn.functional.normalize(matrix, dim=-1).T
    assert int(got[0, 1]) == int(cos.argmax())
    assert text.decode(encoder, ids[0]) == "a red star"
    assert isinstance(text.decode(encoder, got[0]), str) and text.decode(encoder, got[0]).strip()
    with pytest.raises(ValueError, match="unknown projection metric"):
        text.project_nearest(emb, matrix, "dot")


def test_prefix_template_layout(encoder):
    tok = encoder.tokenizer
    t = text.prefix_template(encoder, "a red star", k=3)
    body = tok.encode("a red star")
    assert t.ids[:8].tolist() == [tok.bos_token_id, *[tok.eos_token_id] * 3, *body, tok.eos_token_id]
    assert t.ids[8:].eq(tok.eos_token_id).all() and t.slots.tolist() == [1, 2, 3]
    filled = t.ids_with(torch.tensor(body))
    assert filled.shape == (1, 77) and text.decode(encoder, filled[0]) == "a red star a red star"
    # a prompt too long for k more tokens keeps its EOS: content truncated to 77 - 2 - k tokens
    long = text.prefix_template(encoder, " ".join(["star"] * 80), k=5)
    assert long.ids[-1].item() == tok.eos_token_id and long.ids[1 + 5: 76].eq(body[-1]).all()
    with pytest.raises(ValueError, match="do not fit"):
        text.prefix_template(encoder, "a red star", k=76)
