"""The torch encoder (training only): char-CNN per word + word embedding → BiLSTM, plus an n-gram bag."""

from __future__ import annotations

import msgspec
import torch
import torch.nn.functional as F
from torch import nn


class NetConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sizes of the network (stored in ranker_config.json for the record)."""

    n_chars: int
    n_words: int
    n_ngrams: int
    n_classes: int
    char_dim: int = 24
    conv_widths: tuple[int, ...] = (3, 5)
    conv_channels: int = 32
    word_dim: int = 64
    hidden: int = 96
    bag_dim: int = 64
    proj_dim: int = 64
    dropout: float = 0.3
    bag_weights: bool = False  # learn a weight per n-gram (an IDF-like weighted mean) instead of a plain mean
    n_tags: int = 0  # BIO slot tags of the tagging head over the BiLSTM's word states (0: no head)
    # One more output for out-of-scope rows (trained as a class, TrainConfig.oos_class). The exported
    # ``probs`` keep the intents' columns only, not renormalized: what the out-of-scope column took is
    # missing from every intent's probability, so serving reads the graph as before.
    oos_class: bool = False

    @property
    def n_out(self) -> int:
        """Width of the classifier heads: the intents, plus the out-of-scope class if any."""
        return self.n_classes + int(self.oos_class)


class Dense(nn.Module):
    """A linear layer written as MatMul + Add, so dynamic int8 quantization in onnxruntime applies."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        inner = nn.Linear(n_in, n_out)
        self.weight = nn.Parameter(inner.weight.detach().t().contiguous())
        self.bias = nn.Parameter(inner.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class Net(nn.Module):
    """Two branches whose logits add (a product of experts); one L2-normalized projection for kNN."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.char_emb = nn.Embedding(cfg.n_chars, cfg.char_dim, padding_idx=0)
        self.convs = nn.ModuleList(
            nn.Conv1d(cfg.char_dim, cfg.conv_channels, k, padding=k // 2) for k in cfg.conv_widths
        )
        self.word_emb = nn.Embedding(cfg.n_words, cfg.word_dim, padding_idx=0, sparse=True)
        lstm_in = cfg.conv_channels * len(cfg.conv_widths) + cfg.word_dim
        self.lstm = nn.LSTM(lstm_in, cfg.hidden, batch_first=True, bidirectional=True)
        self.bag_emb = nn.Embedding(cfg.n_ngrams, cfg.bag_dim, padding_idx=0, sparse=True)
        self.bag_w = nn.Embedding(cfg.n_ngrams, 1, padding_idx=0, sparse=True) if cfg.bag_weights else None
        enc_dim = 4 * cfg.hidden
        self.drop = nn.Dropout(cfg.dropout)
        self.head_enc = Dense(enc_dim, cfg.n_out)
        self.head_bag = Dense(cfg.bag_dim, cfg.n_out)
        self.proj = Dense(enc_dim + cfg.bag_dim, cfg.proj_dim)
        self.head_tag = Dense(2 * cfg.hidden, cfg.n_tags) if cfg.n_tags else None

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The big embedding tables: trained with sparse gradients (only touched rows are updated)."""
        tables = [self.word_emb.weight, self.bag_emb.weight] + (
            [self.bag_w.weight] if self.bag_w is not None else []
        )
        return [p for p in self.parameters() if any(p is t for t in tables)]

    def branches(
        self, chars: torch.Tensor, words: torch.Tensor, ngrams: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled encoder features [B, 4H], the n-gram bag [B, bag_dim] and the word states [B, W, 2H]."""
        b, w, length = chars.shape
        flat = chars.reshape(b * w, length)
        inverse = None
        if self.training:
            # Words repeat across a batch: run the char CNN once per distinct word (same result, less work).
            flat, inverse = torch.unique(flat, dim=0, return_inverse=True)
        x = self.char_emb(flat).transpose(1, 2)  # [BW, E, L]
        # Every word is padded to the same width in training and serving, so pad positions need no mask.
        char_feats = torch.cat([torch.relu(conv(x)).amax(dim=2) for conv in self.convs], dim=1)
        if inverse is not None:
            char_feats = char_feats[inverse]
        word_in = torch.cat([char_feats, self.word_emb(words).reshape(b * w, -1)], dim=1).reshape(b, w, -1)
        out, _ = self.lstm(self.drop(word_in))  # [B, W, 2H]; batches share one length
        enc = torch.cat([out.amax(dim=1), out.mean(dim=1)], dim=1)
        mask = (ngrams > 0).unsqueeze(2).to(out.dtype)
        if self.bag_w is not None:
            mask = mask * F.softplus(self.bag_w(ngrams) + 1.0)
        bag = (self.bag_emb(ngrams) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-3)
        return enc, bag, out

    def forward_train(
        self, chars: torch.Tensor, words: torch.Tensor, ngrams: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Combined logits, encoder logits, bag logits, normalized embedding, tag logits [B, W, T],
        and the pooled features [B, 4H + bag_dim] (what a training-only teacher head reads)."""
        enc, bag, states = self.branches(chars, words, ngrams)
        enc_d, bag_d = self.drop(enc), self.drop(bag)
        le, lb = self.head_enc(enc_d), self.head_bag(bag_d)
        feats = torch.cat([enc_d, bag_d], dim=1)
        emb = F.normalize(self.proj(feats), dim=1)
        tags = self.head_tag(self.drop(states)) if self.head_tag is not None else None
        return le + lb, le, lb, emb, tags, feats

    def forward(
        self, chars: torch.Tensor, words: torch.Tensor, ngrams: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Export path: class probabilities, the normalized embedding and (with a head) tag probabilities."""
        enc, bag, states = self.branches(chars, words, ngrams)
        logits = self.head_enc(enc) + self.head_bag(bag)
        emb = self.proj(torch.cat([enc, bag], dim=1))
        emb = emb / torch.sqrt((emb * emb).sum(dim=1, keepdim=True) + 1e-12)
        probs = intent_probs(logits, self.cfg)
        if self.head_tag is None:
            return probs, emb
        return probs, emb, torch.softmax(self.head_tag(states), dim=2)


def intent_probs(logits: torch.Tensor, cfg: NetConfig) -> torch.Tensor:
    """Softmax over the heads' outputs, the intents' columns only (see ``NetConfig.oos_class``)."""
    probs = torch.softmax(logits, dim=1)
    return probs[:, : cfg.n_classes] if cfg.oos_class else probs


class ServingNet(nn.Module):
    """The trained :class:`Net` rearranged for export: the same outputs as ``Net.forward``, fewer graph nodes.

    The char CNN runs as one ``Conv2d`` with ``(1, k)`` kernels over ``[B, E, W, L]``, so no reshape
    to ``[B·W, L]`` and back is traced, and the odd-width convolutions are merged into one: a width-3
    kernel zero-padded to width 5 with padding 2 computes what it computed with padding 1, so both
    branches become one convolution, one ReLU and one max-pool with the channels concatenated in the
    same order. On the home model's shapes this took the optimized onnxruntime graph from 62 to 48
    nodes and a one-thread run from about 170 to 145 µs (random weights, the catalog's val texts).
    """

    conv_w: torch.Tensor
    conv_b: torch.Tensor

    def __init__(self, net: Net) -> None:
        super().__init__()
        self.net = net
        # The trained convolutions, typed (a ModuleList yields Modules); they stay registered under net.
        self.convs: list[nn.Conv1d] = [c for c in net.convs if isinstance(c, nn.Conv1d)]
        widths = tuple(net.cfg.conv_widths)
        self.merged = all(k % 2 == 1 for k in widths)
        with torch.no_grad():
            if self.merged:
                kmax = max(widths)
                weights = [
                    F.pad(conv.weight, ((kmax - k) // 2, (kmax - k) // 2))
                    for conv, k in zip(self.convs, widths, strict=True)
                ]
                self.register_buffer("conv_w", torch.cat(weights, 0).unsqueeze(2).clone())
                self.register_buffer(
                    "conv_b", torch.cat([c.bias for c in self.convs if c.bias is not None]).clone()
                )
                self.pad = kmax // 2

    def _char_feats(self, chars: torch.Tensor) -> torch.Tensor:
        x = self.net.char_emb(chars).permute(0, 3, 1, 2)  # [B, E, W, L]
        if self.merged:
            return torch.relu(F.conv2d(x, self.conv_w, self.conv_b, padding=(0, self.pad))).amax(dim=3)
        # An even width pads asymmetrically in Conv1d (one extra position): keep one conv per width.
        return torch.cat(
            [
                torch.relu(F.conv2d(x, c.weight.unsqueeze(2), c.bias, padding=(0, k // 2))).amax(dim=3)
                for c, k in zip(self.convs, self.net.cfg.conv_widths, strict=True)
            ],
            dim=1,
        )  # [B, C, W]

    def forward(
        self, chars: torch.Tensor, words: torch.Tensor, ngrams: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """What ``Net.forward`` returns (eval mode), for the exporter."""
        net = self.net
        word_in = torch.cat([self._char_feats(chars).transpose(1, 2), net.word_emb(words)], dim=2)
        out, _ = net.lstm(word_in)  # [B, W, 2H]
        enc = torch.cat([out.amax(dim=1), out.mean(dim=1)], dim=1)
        mask = (ngrams > 0).unsqueeze(2).to(out.dtype)
        if net.bag_w is not None:
            mask = mask * F.softplus(net.bag_w(ngrams) + 1.0)
        bag = (net.bag_emb(ngrams) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-3)
        logits = net.head_enc(enc) + net.head_bag(bag)
        emb = net.proj(torch.cat([enc, bag], dim=1))
        emb = emb / torch.sqrt((emb * emb).sum(dim=1, keepdim=True) + 1e-12)
        probs = intent_probs(logits, net.cfg)
        if net.head_tag is None:
            return probs, emb
        return probs, emb, torch.softmax(net.head_tag(out), dim=2)


def supcon_loss(emb: torch.Tensor, labels: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) over a batch; rows with label < 0 are only negatives."""
    sim = emb @ emb.t() / tau
    n = emb.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    sim = sim.masked_fill(eye, -1e9)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~eye & (labels.unsqueeze(1) >= 0)
    counts = same.sum(dim=1)
    anchors = counts > 0
    if not bool(anchors.any()):
        return emb.sum() * 0.0
    per_anchor = (log_prob * same).sum(dim=1)[anchors] / counts[anchors]
    return -per_anchor.mean()
