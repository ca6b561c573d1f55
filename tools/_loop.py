"""The torch training loop: length-bucketed batches, CE + supervised contrastive + outlier exposure."""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec
import numpy as np

# Measured here: with OpenMP's default pool on a busy 2-core machine, element-wise torch ops ran 5-40x
# slower (workers spin while the cores are taken); set before torch loads, unless the caller chose.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
import torch.nn.functional as F
from tqdm import tqdm

from skill.features import UNK, Featurizer

from ._augment import augment, augment_tagged, span_pool, swap_spans
from ._model import Net, NetConfig, supcon_loss
from ._transfer import TransferSet

_LOGGER = logging.getLogger(__name__)


class TrainConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Optimisation settings (stored with the model)."""

    epochs: int = 40
    hidden: int = 96  # BiLSTM units per direction (NetConfig.hidden)
    word_dim: int = 64  # the word table's width (NetConfig.word_dim), where teacher word vectors land
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    branch_weight: float = 0.5  # CE of each branch on its own, next to the combined CE
    supcon_weight: float = 0.2
    supcon_tau: float = 0.1
    oe_weight: float = 0.5  # outlier exposure: push oos rows towards a uniform softmax
    # Out-of-scope rows as a class of their own (one more classifier output, cross-entropy like an
    # intent's, branches included) instead of outlier exposure; NetConfig.oos_class. The transfer
    # set's teacher labels then keep their out-of-scope column too.
    oos_class: bool = False
    # With oos_class: the out-of-scope rows' cross-entropy (a mean over those rows, like the intents'
    # over theirs) is multiplied by this; 1.0 gives a batch's out-of-scope rows together the weight of
    # its in-scope rows together.
    oos_class_weight: float = 1.0
    augment_rate: float = 0.3
    # Per span and epoch, the chance a tagged span is replaced by another span of the same slot and
    # intent from training (entity substitution). Measured at 0.5 on the embedded model (session 5):
    # tagger val F1 0.711 either way, accuracy 93.6 -> 93.2 %, OOS AUROC 0.942 -> 0.933; off.
    span_swap_rate: float = 0.0
    ngram_dropout: float = 0.0  # drop n-gram ids (measured: no gain on CLINC150, see docs/RANKER.md)
    word_dropout: float = 0.0  # replace word ids by "unknown" (measured: no gain)
    label_smoothing: float = 0.1
    threads: int = 1  # torch intra-op threads (the brief allows 2; 1 is faster on a shared machine)
    ema_decay: float = 0.998  # > 0: export an exponential moving average of the weights (0: last weights)
    ema_start: float = 0.5  # share of the training steps after which the average starts
    # Token cross-entropy of the slot-tagging head (rows with span labels only); 1.0 over 0.5 on val
    # (session 4, with word vectors): tagger span F1 0.736 vs 0.650, accuracy 93.8 vs 93.5 %.
    tag_weight: float = 1.0
    distill_weight: float = 1.0  # cosine loss towards the teacher's embedding (only with teacher targets)
    distill_oos: bool = True  # distil out-of-scope rows too (val: better than in-scope only, RANKER.md)
    # What the distillation head reads: "emb" (the 64-d kNN projection) or "feats" (the pooled encoder
    # and n-gram features under it, 4H + bag_dim, which the classifier heads read too).
    distill_from: Literal["emb", "feats"] = "emb"
    # Teacher word vectors: the top N words per language (wordfreq) join the word table; every row of it
    # with a vector is pulled towards a learned projection of that vector (weight below), so a word no
    # training text used still lands where its teacher neighbours are. 0: off. Only with a teacher.
    word_vectors: int = 8000
    word_vector_weight: float = 0.1
    word_vector_batch: int = 512
    # Teacher soft labels: a cross-entropy towards the intent mix of each row's k nearest training rows
    # in the teacher's space (in-scope rows, itself left out); 0: off. Only with teacher targets.
    soft_label_weight: float = 0.0
    soft_label_k: int = 10
    soft_label_tau: float = 0.05
    # "knn" (above) or "linear": a softmax regression on the teacher's embeddings of the in-scope
    # training rows, cross-fitted (each row's target comes from the folds it is not in), L2 like
    # scikit-learn's C; its class probabilities are the target. The frozen teacher with such a head
    # reaches 96.4 % on CLINC150's val split (4 s per fit), where the student is at 94-95 %.
    soft_label_kind: Literal["knn", "linear"] = "knn"
    soft_label_c: float = 100.0
    soft_label_folds: int = 5
    # Clean/noisy consistency: for a row the augmentation changed (same word count), the prediction and
    # kNN embedding of the noisy text are pulled towards the network's own, gradient-free view of the
    # clean text (KL + cosine), so a typo lands where its clean sentence does. 0: off.
    consistency_weight: float = 0.0
    # Transfer-set distillation (tools/_transfer.py): per training text this many variants (words
    # dropped or swapped, n-grams), labelled by a softmax regression on the teacher's embeddings; the
    # student learns their class distribution (soft cross-entropy at ``transfer_weight``, its branches
    # at ``branch_weight`` of that) and their teacher embedding. ``transfer_share`` of the variants
    # join each epoch (a fresh draw each time). 0: off. Only with a teacher.
    transfer_per_row: int = 0
    transfer_weight: float = 1.0
    transfer_share: float = 0.5
    # What a swapped word becomes: "corpus" (a word of the training texts, same script) or "teacher"
    # (one of its ``transfer_neighbours`` nearest words by teacher word vectors, the frequent words
    # training never used among them; their rows of the word table follow the learned map each epoch).
    transfer_swap: Literal["corpus", "teacher"] = "corpus"
    transfer_neighbours: int = 5
    # The share of a variant's target that is its source row's label (one-hot; uniform for an
    # out-of-scope source) instead of the teacher classifier's distribution. 0: the teacher's alone.
    transfer_label_mix: float = 0.0
    # Keep only the variants of an in-scope row whose teacher-classifier top intent is the row's own
    # (the teacher reads topic, not polarity: "stop the timer but don't clear it" cut to "stop the
    # timer ... clear it" is *cancel* to it; such a variant is dropped rather than taught).
    transfer_agree: bool = False
    # Whether the variants carry their source row's spans (word by word) into the tagging head's loss.
    # Off: the tagger learns from the catalog's own markup only; the variants still teach the intents.
    transfer_tags: bool = True
    # The share of out-of-scope rows the calibration map is fitted for: val's out-of-scope rows are
    # weighted so that they carry this share of the fit (in-scope rows the rest). The map's base rate is
    # then a declared property of the traffic rather than of how many negatives the catalog happens to
    # hold (a negatives pass that grows val's out-of-scope share from 18 to 27 % otherwise makes every
    # answer more timid). 0: val's own mix.
    calib_oos_share: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.0


def teacher_soft_labels(  # noqa: PLR0917 - arrays of one training run and its two settings
    teacher: np.ndarray, labels: Sequence[int], n_classes: int, k: int, tau: float, chunk: int = 1024
) -> np.ndarray:
    """[rows, classes]: for each in-scope row, the intents of its ``k`` nearest in-scope training rows in
    the teacher's space (itself excluded), weighted by softmax(similarity / ``tau``); zeros for
    out-of-scope rows. A row whose teacher neighbours are all its own intent gets its one-hot label."""
    y = np.asarray(labels)
    inside = np.nonzero(y >= 0)[0]
    out = np.zeros((len(y), n_classes), dtype=np.float32)
    if len(inside) < 2:
        return out
    t = np.ascontiguousarray(teacher[inside], dtype=np.float32)
    kk = min(k, len(inside) - 1)
    for start in range(0, len(inside), chunk):
        sims = t[start : start + chunk] @ t.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # not itself
        nn = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        s = sims[rows[:, None], nn] / tau
        w = np.exp(s - s.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        block = np.zeros((len(rows), n_classes), dtype=np.float32)
        np.add.at(block, (np.repeat(rows, kk), y[inside][nn].reshape(-1)), w.reshape(-1))
        out[inside[start : start + chunk]] = block
    return out


def _softmax_regression(
    x: torch.Tensor, t: torch.Tensor, n_classes: int, c: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a multinomial logistic regression (mean CE + ||W||² / (2·c·n)), L-BFGS."""
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")
    lam = 1.0 / (c * len(t))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, t) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return w.detach(), b.detach()


def teacher_linear_soft_labels(  # noqa: PLR0917 - arrays of one training run and its settings
    teacher: np.ndarray, labels: Sequence[int], n_classes: int, c: float, folds: int, iters: int = 100
) -> np.ndarray:
    """[rows, classes]: cross-fitted class probabilities of a softmax regression on the teacher's
    embeddings of the in-scope rows; zeros for out-of-scope rows.

    Row ``i`` of the in-scope rows (in order) is in fold ``i % folds``; its target comes from the
    regression fitted on the other folds, so no row is its own evidence. The loss is the mean
    cross-entropy plus ``||W||² / (2·c·n)``, scikit-learn's C; full-batch L-BFGS from zeros, so the
    result depends on the data only.
    """
    y = np.asarray(labels)
    inside = np.nonzero(y >= 0)[0]
    out = np.zeros((len(y), n_classes), dtype=np.float32)
    if len(inside) < 2 or folds < 2:
        return out
    x_all = torch.from_numpy(np.ascontiguousarray(teacher[inside], dtype=np.float32))
    y_all = torch.from_numpy(y[inside].astype(np.int64))
    fold = np.arange(len(inside)) % folds
    for f in range(folds):
        fit_rows = torch.from_numpy(np.nonzero(fold != f)[0])
        held = np.nonzero(fold == f)[0]
        if not len(held):
            continue
        w, b = _softmax_regression(x_all[fit_rows], y_all[fit_rows], n_classes, c, iters)
        with torch.no_grad():
            probs = F.softmax(x_all[torch.from_numpy(held)] @ w + b, dim=1).numpy()
        out[inside[held]] = probs
    return out


def _batches(
    feat: Featurizer,
    texts: Sequence[str],
    batch_size: int,
    rng: random.Random | None,
    rows: Sequence[int] | None = None,
) -> list[list[int]]:
    """Index batches whose utterances have the same word count (so no padding reaches the BiLSTM);
    ``rows``: only these indices of ``texts`` (default: all)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(texts)) if rows is None else rows:
        groups[feat.n_tokens(texts[i])].append(i)
    out: list[list[int]] = []
    for n in sorted(groups):
        idx = groups[n]
        if rng is not None:
            rng.shuffle(idx)
        out.extend(idx[j : j + batch_size] for j in range(0, len(idx), batch_size))
    if rng is not None:
        rng.shuffle(out)
    return out


def _tensors(feat: Featurizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = feat.encode(texts)
    return torch.from_numpy(enc.chars), torch.from_numpy(enc.words), torch.from_numpy(enc.ngrams)


def _consistency(  # noqa: PLR0917 - one batch's tensors
    net: Net,
    feat: Featurizer,
    clean: Sequence[str],
    noisy: Sequence[str],
    batch: Sequence[int],
    logits: torch.Tensor,
    emb: torch.Tensor,
) -> torch.Tensor:
    """KL(clean || noisy) of the softmax plus 1 - cosine of the kNN embeddings, over the batch rows the
    augmentation changed without changing their word count (the clean batch then needs no padding).
    The clean view is computed without gradient and without dropout: it is the target, not a second
    student."""
    pick = [
        r
        for r, i in enumerate(batch)
        if noisy[i] != clean[i] and feat.n_tokens(noisy[i]) == feat.n_tokens(clean[i])
    ]
    if not pick:
        return logits.sum() * 0.0
    with torch.no_grad():
        net.eval()
        c_logits, _, _, c_emb, _, _ = net.forward_train(*_tensors(feat, [clean[batch[r]] for r in pick]))
        net.train()
        target = F.softmax(c_logits, dim=1)
    rows = torch.tensor(pick, dtype=torch.long)
    kl = (target * (torch.log(target.clamp_min(1e-8)) - F.log_softmax(logits[rows], dim=1))).sum(1).mean()
    return kl + (1.0 - (emb[rows] * c_emb).sum(dim=1)).mean()


def fit_net(
    feat: Featurizer,
    texts: Sequence[str],
    labels: Sequence[int],
    n_classes: int,
    *,
    seed: int,
    cfg: TrainConfig,
    progress: bool,
    tags: Sequence[list[int] | None] | None = None,
    n_tags: int = 0,
    teacher: np.ndarray | None = None,
    word_targets: np.ndarray | None = None,
    transfer: TransferSet | None = None,
) -> Net:
    """Train a fresh :class:`Net` on canonicalized texts; label -1 marks out-of-scope rows.

    ``tags`` gives, per row, a BIO label id per model token (None: the row has no span labels); with
    ``n_tags`` > 0 a tagging head is trained on them jointly. ``teacher`` [rows, D] are a teacher's
    centred, normalized embeddings of the rows' raw texts: a linear head (not exported) maps the
    student's kNN embedding onto them under a cosine loss, so that embedding carries the teacher's
    geometry (paraphrases the teacher puts together land together) next to the labels' contrast.
    ``word_targets`` [n_words, D] are teacher word vectors per word id (all-zero rows: none): a linear
    map (not exported) from them to the word table is learned on the words training used (their rows
    are pulled towards it), and at the end it fills the rows of the words training never used.
    ``transfer`` (with a teacher and ``cfg.transfer_per_row`` > 0): unlabelled variants with the
    teacher's class distribution and embedding; they join the batches as rows of label -2.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(cfg.threads, 2)))
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = feat.vocab
    n_tags = n_tags if tags is not None and any(t is not None for t in tags) else 0
    net = Net(
        NetConfig(
            vocab.n_chars,
            vocab.n_words,
            vocab.n_ngrams,
            n_classes,
            hidden=cfg.hidden,
            word_dim=cfg.word_dim,
            n_tags=n_tags,
            oos_class=cfg.oos_class,
        )
    )
    n_out = net.cfg.n_out
    row_tags: list[list[int] | None] = list(tags) if n_tags and tags is not None else [None] * len(texts)
    n_base = len(texts)
    p_all: torch.Tensor | None = None
    if transfer is not None and teacher is not None and cfg.transfer_per_row > 0 and transfer.texts:
        n_extra = len(transfer.texts)
        texts = [*texts, *transfer.texts]
        extra_tags = (
            transfer.tags if n_tags and cfg.transfer_tags and transfer.tags is not None else [None] * n_extra
        )
        row_tags = [*row_tags, *extra_tags]
        if transfer.probs.shape[1] != n_out:
            raise ValueError(f"transfer labels have {transfer.probs.shape[1]} classes, the heads {n_out}")
        probs = np.zeros((n_base + n_extra, n_out), dtype=np.float32)
        probs[n_base:] = transfer.probs
        p_all = torch.from_numpy(probs)
    extra_rows = list(range(n_base, len(texts)))
    n_draw = round(len(extra_rows) * min(1.0, max(0.0, cfg.transfer_share)))
    sparse_ids = {id(p) for p in net.sparse_parameters()}
    dense = [p for p in net.parameters() if id(p) not in sparse_ids]
    distill_head: torch.nn.Linear | None = None
    t_all: torch.Tensor | None = None
    if teacher is not None and cfg.distill_weight > 0:
        # A linear map from the kNN embedding (or the pooled features under it): what it must carry of
        # the teacher's space. TrainConfig(...) built in code is not validated, so check the choice here.
        if cfg.distill_from not in {"emb", "feats"}:
            raise ValueError(f"distill_from {cfg.distill_from!r}: expected 'emb' or 'feats'")
        width = net.cfg.proj_dim if cfg.distill_from == "emb" else 4 * net.cfg.hidden + net.cfg.bag_dim
        distill_head = torch.nn.Linear(width, teacher.shape[1])
        dense += list(distill_head.parameters())
        t_np = teacher if p_all is None or transfer is None else np.concatenate([teacher, transfer.teacher])
        t_all = torch.from_numpy(np.ascontiguousarray(t_np, dtype=np.float32))
    q_all: torch.Tensor | None = None
    if teacher is not None and cfg.soft_label_weight > 0:
        if cfg.soft_label_kind == "linear":
            soft = teacher_linear_soft_labels(
                teacher, labels, n_classes, cfg.soft_label_c, cfg.soft_label_folds
            )
        elif cfg.soft_label_kind == "knn":
            soft = teacher_soft_labels(teacher, labels, n_classes, cfg.soft_label_k, cfg.soft_label_tau)
        else:
            raise ValueError(f"soft_label_kind {cfg.soft_label_kind!r}: expected 'knn' or 'linear'")
        q_all = torch.from_numpy(np.pad(soft, ((0, len(texts) - n_base), (0, n_out - n_classes))))
    word_head: torch.nn.Linear | None = None
    w_all: torch.Tensor | None = None
    w_ids: torch.Tensor | None = None
    w_extra: torch.Tensor | None = None
    if word_targets is not None and cfg.word_vector_weight > 0:
        word_head = torch.nn.Linear(word_targets.shape[1], net.cfg.word_dim)
        dense += list(word_head.parameters())
        w_all = torch.from_numpy(np.ascontiguousarray(word_targets, dtype=np.float32))
        has = w_all.abs().sum(dim=1) > 0
        trained = torch.arange(len(w_all)) < feat.vocab.n_trained_words
        w_ids = torch.nonzero(has & trained).squeeze(1)  # the map is learned on words training used
        w_extra = torch.nonzero(has & ~trained).squeeze(1)  # ... and fills the rows of the others
    opts = [
        torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay),
        torch.optim.SparseAdam(net.sparse_parameters(), lr=cfg.lr),
    ]
    steps_per_epoch = len(_batches(feat, texts, cfg.batch_size, None, [*range(n_base), *extra_rows[:n_draw]]))
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = max(1, total // 20)

    def lr_at(step: int) -> float:
        # Linear warm-up then linear decay; batch counts vary a little with augmentation, hence the floor.
        return min((step + 1) / warm, max(0.02, 1.0 - step / total))

    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lr_at) for opt in opts]
    y_all = torch.tensor([*labels, *([-2] * (len(texts) - n_base))], dtype=torch.long)
    params = list(net.parameters())
    shadow: list[torch.Tensor] | None = None
    step_no = 0
    tagged_ok = [
        tg is not None and len(tg) == feat.n_tokens(t) and len(t.split()) == len(tg)
        for t, tg in zip(texts, row_tags, strict=True)
    ]
    pool = span_pool(
        [
            (int(lab), t.split(), tg)
            for t, tg, lab, ok in zip(texts, row_tags, y_all.tolist(), tagged_ok, strict=True)
            if ok and tg
        ]
    )
    bar = tqdm(total=cfg.epochs, desc="train", unit="epoch", disable=not progress)
    for epoch in range(cfg.epochs):
        if epoch and extra_rows and word_head is not None and w_all is not None and w_extra is not None:
            with torch.no_grad():  # variants use untrained words: give them the map's vector meanwhile
                net.word_emb.weight[w_extra] = word_head(w_all[w_extra])
        net.train()
        noisy: list[str] = []
        noisy_tags: list[list[int] | None] = []
        for t, tg, lab, ok in zip(texts, row_tags, y_all.tolist(), tagged_ok, strict=True):
            if not ok or tg is None:
                noisy.append(augment(t, rng, cfg.augment_rate))
                noisy_tags.append(None)
            else:
                words_t, tg2 = swap_spans(t.split(), tg, int(lab), pool, rng, cfg.span_swap_rate)
                words_t, tg2 = augment_tagged(words_t, tg2, rng, cfg.augment_rate)
                noisy.append(" ".join(words_t))
                noisy_tags.append(tg2)
        loss_sum, n_seen = 0.0, 0
        active = [*range(n_base), *(rng.sample(extra_rows, n_draw) if n_draw else [])]
        for batch in _batches(feat, noisy, cfg.batch_size, rng, active):
            chars, words, grams = _tensors(feat, [noisy[i] for i in batch])
            if cfg.ngram_dropout > 0:
                grams = grams.masked_fill(torch.rand(grams.shape, generator=gen) < cfg.ngram_dropout, 0)
            if cfg.word_dropout > 0:
                hit = (torch.rand(words.shape, generator=gen) < cfg.word_dropout) & (words > 0)
                words = words.masked_fill(hit, UNK)
            y = y_all[batch]
            logits, le, lb, emb, tag_logits, pooled = net.forward_train(chars, words, grams)
            inside = y >= 0
            loss = emb.sum() * 0.0
            if distill_head is not None and t_all is not None and (cfg.distill_oos or bool(inside.any())):
                # distill_oos=False leaves out-of-scope rows out (the teacher puts "how do I descale the
                # kettle" next to "turn on the kettle"); measured on val it did worse than distilling all.
                rows_t = slice(None) if cfg.distill_oos else inside
                source = emb if cfg.distill_from == "emb" else pooled
                pred = F.normalize(distill_head(source[rows_t]), dim=1)
                target = t_all[batch][rows_t]
                loss = loss + cfg.distill_weight * (1.0 - (pred * target).sum(dim=1)).mean()
            if word_head is not None and w_all is not None and w_ids is not None and len(w_ids):
                pick = w_ids[torch.randint(len(w_ids), (cfg.word_vector_batch,), generator=gen)]
                gap = net.word_emb(pick) - word_head(w_all[pick])
                loss = loss + cfg.word_vector_weight * gap.pow(2).mean()
            if tag_logits is not None and cfg.tag_weight > 0:
                width = tag_logits.shape[1]
                gold = torch.full((len(batch), width), -100, dtype=torch.long)
                for r, i in enumerate(batch):
                    tg = noisy_tags[i]
                    if tg is not None and len(tg) == width:
                        gold[r] = torch.tensor(tg, dtype=torch.long)
                if bool((gold >= 0).any()):
                    loss = loss + cfg.tag_weight * F.cross_entropy(
                        tag_logits.reshape(-1, tag_logits.shape[2]), gold.reshape(-1), ignore_index=-100
                    )
            if bool(inside.any()):
                yi = y[inside]
                loss = loss + F.cross_entropy(logits[inside], yi, label_smoothing=cfg.label_smoothing)
                loss = loss + cfg.branch_weight * (
                    F.cross_entropy(le[inside], yi) + F.cross_entropy(lb[inside], yi)
                )
                if q_all is not None:
                    q = q_all[batch][inside]
                    loss = (
                        loss
                        - cfg.soft_label_weight * (q * F.log_softmax(logits[inside], dim=1)).sum(1).mean()
                    )
            soft_rows = y == -2
            if p_all is not None and bool(soft_rows.any()):
                p = p_all[batch][soft_rows]
                soft_ce = -(p * F.log_softmax(logits[soft_rows], dim=1)).sum(1).mean()
                soft_ce = soft_ce + cfg.branch_weight * (
                    -(p * F.log_softmax(le[soft_rows], dim=1)).sum(1).mean()
                    - (p * F.log_softmax(lb[soft_rows], dim=1)).sum(1).mean()
                )
                loss = loss + cfg.transfer_weight * soft_ce
            oos_rows = y == -1
            if bool(oos_rows.any()) and cfg.oos_class:
                yo = torch.full((int(oos_rows.sum()),), n_classes, dtype=torch.long)
                w_oos = cfg.oos_class_weight  # times 1.0 is exact: the default trains as before
                loss = loss + w_oos * F.cross_entropy(
                    logits[oos_rows], yo, label_smoothing=cfg.label_smoothing
                )
                loss = loss + w_oos * cfg.branch_weight * (
                    F.cross_entropy(le[oos_rows], yo) + F.cross_entropy(lb[oos_rows], yo)
                )
            elif bool(oos_rows.any()) and cfg.oe_weight > 0:
                loss = loss - cfg.oe_weight * F.log_softmax(logits[oos_rows], dim=1).mean()
            labelled = ~soft_rows  # the variants have no label: not part of the contrast
            if int(labelled.sum()) > 1:
                loss = loss + cfg.supcon_weight * supcon_loss(emb[labelled], y[labelled], cfg.supcon_tau)
            if cfg.consistency_weight > 0:
                loss = loss + cfg.consistency_weight * _consistency(
                    net, feat, texts, noisy, batch, logits, emb
                )
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dense, 5.0)
            for opt, sched in zip(opts, scheds, strict=True):
                opt.step()
                sched.step()
            step_no += 1
            if cfg.ema_decay > 0 and step_no >= cfg.ema_start * total:
                with torch.no_grad():
                    if shadow is None:
                        shadow = [p.detach().clone() for p in params]
                    else:
                        torch._foreach_lerp_(shadow, [p.detach() for p in params], 1.0 - cfg.ema_decay)
            loss_sum += float(loss.detach()) * len(batch)
            n_seen += len(batch)
        bar.set_postfix(loss=f"{loss_sum / max(1, n_seen):.3f}")
        bar.update(1)
        _LOGGER.debug("epoch %d loss %.4f", epoch, loss_sum / max(1, n_seen))
    bar.close()
    if shadow is not None:
        with torch.no_grad():
            for p, avg in zip(params, shadow, strict=True):
                p.copy_(avg)
    if word_head is not None and w_all is not None and w_extra is not None and len(w_extra):
        with torch.no_grad():  # a word no training text used: where the learned map puts its vector
            net.word_emb.weight[w_extra] = word_head(w_all[w_extra])
    net.eval()
    return net


@torch.no_grad()
def predict(
    net: Net, feat: Featurizer, texts: Sequence[str], batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and normalized embeddings (fp32 torch), in input order."""
    net.eval()
    probs = np.zeros((len(texts), net.cfg.n_classes), dtype=np.float32)
    embs = np.zeros((len(texts), net.cfg.proj_dim), dtype=np.float32)
    for batch in _batches(feat, texts, batch_size, None):
        p, e = net(*_tensors(feat, [texts[i] for i in batch]))[:2]
        probs[batch] = p.numpy()
        embs[batch] = e.numpy()
    return probs, embs
