"""Seeded synthetic multimodal tasks for the reference VLM: coloured-cell images, text facts, one-token answers.

A *context* is a multi-image prompt: for each image some filler words, sometimes a text fact
``key K is V .``, then ``img k`` and the image itself (the word ``<image>``, which becomes four
placeholder tokens: one per cell of the image's 2x2 grid of coloured cells). A *question* follows
the context directly and its answer is one word (one token):

========== ======================== =====================================================
kind       question                 answer
========== ======================== =====================================================
lookup     ``colour k CELL``        the colour of cell ``CELL`` of image ``k``
retrieve   ``which CELL X``         the index of the only image whose cell ``CELL`` is ``X``
count      ``count k X``            how many cells of image ``k`` are ``X`` (``zero`` to ``four``)
needle     ``key K``                the value ``V`` of the text fact ``key K is V .``
========== ======================== =====================================================

Everything is drawn from a seeded ``random.Random``, so a seed fixes a data set; the
held-out sets use :data:`HELDOUT_SEED`, which training never uses.

```python
from kvpress_mm.apps.reference.tasks import heldout_prompts

prompts = heldout_prompts(n_images=8, contexts=4)
print(prompts[0].text, "->", prompts[0].answer)
```
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: The colours of the cells, with their RGB values (distinct and saturated, so solid patches separate).
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
#: The cells of an image's 2x2 grid, row-major: the order of the image's four placeholder tokens.
CELLS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
#: Names of the text facts' keys (``key K is V .``).
KEYS: tuple[str, ...] = (
    "apple", "river", "candle", "tiger", "violin", "garden", "rocket", "pencil",
    "island", "mirror", "falcon", "lantern", "meadow", "anchor", "cactus", "helmet",
)  # fmt: skip
#: Filler words between the structured parts of a context.
FILLERS: tuple[str, ...] = (
    "the", "a", "then", "here", "next", "and", "we", "see", "look", "now", "this", "photo",
    "shows", "picture", "so", "more", "also", "another", "scene", "view", "of", "with", "some", "there",
)  # fmt: skip
#: Most images a context can hold (image indices are the words ``1`` .. ``MAX_IMAGES``).
MAX_IMAGES = 16
#: Image indices ``1`` .. ``MAX_IMAGES`` (the answers of retrieve questions).
NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(1, MAX_IMAGES + 1))
#: Answers of count questions, ``zero`` .. ``four``: words, not digits, so a count is never the
#: same token as an image index (a retrieve answer, and the ``k`` in ``count k X``).
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
#: Structural words of contexts and questions.
STRUCTURE: tuple[str, ...] = ("img", "key", "is", ".", "colour", "which", "count")
#: The placeholder word of one image in a prompt's text.
IMAGE_WORD = "<image>"
#: The task kinds, in the order reports list them.
TASK_KINDS: tuple[str, ...] = ("lookup", "retrieve", "count", "needle")

#: Seed of the training stream (the training script's default).
TRAIN_SEED = 0
#: Seed of every held-out set; training never uses it.
HELDOUT_SEED = 1_000_003


@dataclass(frozen=True)
class ColourGrid:
    """One image: the colours of its 2x2 cells, row-major (``CELLS`` order)."""

    cells: tuple[str, str, str, str]

    def count(self, colour: str) -> int:
        """How many cells have ``colour``."""
        return sum(c == colour for c in self.cells)


@dataclass(frozen=True)
class Fact:
    """A text fact ``key K is V .``: ``key`` is in :data:`KEYS`, ``value`` in :data:`COLOURS`."""

    key: str
    value: str

    @property
    def words(self) -> tuple[str, ...]:
        """The fact's words."""
        return ("key", self.key, "is", self.value, ".")


@dataclass(frozen=True)
class Question:
    """A question about a context, with its one-word answer.

    Attributes:
        kind: one of :data:`TASK_KINDS`.
        words: the question's words; the answer follows the last one.
        answer: the one-word answer.

    """

    kind: str
    words: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class Context:
    """A multi-image context: its words (``<image>`` marks each image) and the images, in order.

    Attributes:
        words: the context's words; the i-th ``<image>`` is ``images[i]``, announced by ``img i+1``.
        images: the images.
        facts: the text facts the context states.

    """

    words: tuple[str, ...]
    images: tuple[ColourGrid, ...]
    facts: tuple[Fact, ...]

    @property
    def n_images(self) -> int:
        """Number of images."""
        return len(self.images)


@dataclass(frozen=True)
class TaskPrompt:
    """One evaluation prompt: a context and one question right after it.

    The prompt's last word is the question's last word, so the next token is the answer:
    ``model.generate(**inputs, max_new_tokens=1)`` answers it.
    """

    context: Context
    question: Question

    @property
    def kind(self) -> str:
        """The question's task kind."""
        return self.question.kind

    @property
    def answer(self) -> str:
        """The expected one-word answer."""
        return self.question.answer

    @property
    def words(self) -> tuple[str, ...]:
        """All words of the prompt (context then question)."""
        return self.context.words + self.question.words

    @property
    def text(self) -> str:
        """The prompt as text, one ``<image>`` per image (what a LLaVA processor takes)."""
        return " ".join(self.words)

    @property
    def images(self) -> tuple[ColourGrid, ...]:
        """The prompt's images, in order."""
        return self.context.images


@dataclass(frozen=True)
class TrainingExample:
    """A context followed by many question/answer pairs (the answers are the loss targets).

    Attributes:
        context: the shared context.
        questions: the questions, asked one after the other, each followed by its answer.

    """

    context: Context
    questions: tuple[Question, ...]

    @property
    def words(self) -> tuple[str, ...]:
        """The context, then each question and its answer."""
        words = list(self.context.words)
        for q in self.questions:
            words.extend(q.words)
            words.append(q.answer)
        return tuple(words)


def vocabulary() -> list[str]:
    """The reference model's word list, in token-id order (special tokens first)."""
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", IMAGE_WORD]
    words = [*specials, *STRUCTURE, *CELLS, *COLOURS, *NUMBERS, *COUNT_WORDS, *KEYS, *FILLERS]
    assert len(set(words)) == len(words), "vocabulary words must be unique"
    return words


@dataclass(frozen=True)
class TaskConfig:
    """Knobs of the generator (the defaults are what the shipped model was trained on).

    Attributes:
        max_fillers: most filler words before an image (and after the last one).
        min_facts: fewest text facts in a context.
        max_facts: most text facts in a context.

    """

    max_fillers: int = 2
    min_facts: int = 1
    max_facts: int = 4


@dataclass
class TaskGenerator:
    """Draws contexts, questions, evaluation prompts and training examples from one seeded stream.

    ```python
    gen = TaskGenerator(seed=0)
    prompt = gen.prompt(n_images=4, kind="lookup")
    example = gen.training_example(n_images=4, per_kind=8)
    ```
    """

    seed: int = TRAIN_SEED
    config: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # -- contexts --------------------------------------------------------------------------

    def image(self) -> ColourGrid:
        """An image whose cells use a palette of 1 to 4 colours (so every count 0..4 occurs)."""
        palette = self.rng.sample(COLOURS, self.rng.randint(1, 4))
        cells = list(palette) + [self.rng.choice(palette) for _ in range(4 - len(palette))]
        self.rng.shuffle(cells)
        return ColourGrid((cells[0], cells[1], cells[2], cells[3]))

    def context(self, n_images: int) -> Context:
        """A context with ``n_images`` images, facts about distinct keys, and fillers."""
        if not 1 <= n_images <= MAX_IMAGES:
            raise ValueError(f"n_images must be in 1..{MAX_IMAGES}, got {n_images}")
        rng, cfg = self.rng, self.config
        images = tuple(self.image() for _ in range(n_images))
        while not _unique_cells(images):  # a retrieve question needs one (cell, colour) only one image has
            images = tuple(self.image() for _ in range(n_images))
        n_facts = rng.randint(cfg.min_facts, cfg.max_facts)
        facts = tuple(Fact(k, rng.choice(COLOURS)) for k in rng.sample(KEYS, n_facts))
        slots = [rng.randint(0, n_images) for _ in facts]  # fact i goes before image slots[i] (n: at the end)
        words: list[str] = []
        for i in range(n_images + 1):
            words.extend(rng.choice(FILLERS) for _ in range(rng.randint(0, cfg.max_fillers)))
            for fact, slot in zip(facts, slots):
                if slot == i:
                    words.extend(fact.words)
            if i < n_images:
                words.extend(("img", str(i + 1), IMAGE_WORD))
        return Context(tuple(words), images, facts)

    # -- questions -------------------------------------------------------------------------

    def question(self, context: Context, kind: str) -> Question:
        """A random question of ``kind`` about ``context``."""
        rng = self.rng
        n = context.n_images
        if kind == "lookup":
            k, c = rng.randrange(n), rng.randrange(4)
            return Question(kind, ("colour", str(k + 1), CELLS[c]), context.images[k].cells[c])
        if kind == "retrieve":
            unique = _unique_cells(context.images)  # image index -> its (cell, colour) no other image has
            k = rng.choice(sorted(unique))
            c, colour = rng.choice(unique[k])
            return Question(kind, ("which", CELLS[c], colour), str(k + 1))
        if kind == "count":
            by_count: dict[int, list[tuple[int, str]]] = {}
            for k, image in enumerate(context.images):
                for colour in COLOURS:
                    by_count.setdefault(image.count(colour), []).append((k, colour))
            count = rng.choice(sorted(by_count))  # balanced over the counts the context offers
            k, colour = rng.choice(by_count[count])
            return Question(kind, ("count", str(k + 1), colour), COUNT_WORDS[count])
        if kind == "needle":
            fact = rng.choice(context.facts)
            return Question(kind, ("key", fact.key), fact.value)
        raise ValueError(f"unknown task kind {kind!r}; the kinds are {', '.join(TASK_KINDS)}")

    # -- prompts ---------------------------------------------------------------------------

    def prompt(self, n_images: int, kind: str) -> TaskPrompt:
        """A fresh context and one question of ``kind`` right after it."""
        context = self.context(n_images)
        return TaskPrompt(context, self.question(context, kind))

    def prompts_per_context(self, n_images: int, kinds: Sequence[str] = TASK_KINDS) -> list[TaskPrompt]:
        """A fresh context and one prompt per kind on it (one question each)."""
        context = self.context(n_images)
        return [TaskPrompt(context, self.question(context, kind)) for kind in kinds]

    def training_example(self, n_images: int, per_kind: int = 8, kinds: Sequence[str] = TASK_KINDS) -> TrainingExample:
        """A fresh context and up to ``per_kind`` distinct questions of each kind, shuffled.

        Contexts with few images or facts have fewer distinct questions; a question is never
        repeated within an example (its answer would be a copy of the earlier one).
        """
        context = self.context(n_images)
        questions: list[Question] = []
        for kind in kinds:
            seen: set[tuple[str, ...]] = set()
            for _ in range(4 * per_kind):
                if len(seen) == per_kind:
                    break
                q = self.question(context, kind)
                if q.words not in seen:
                    seen.add(q.words)
                    questions.append(q)
        self.rng.shuffle(questions)
        return TrainingExample(context, tuple(questions))


def _unique_cells(images: Sequence[ColourGrid]) -> dict[int, list[tuple[int, str]]]:
    """For each image index, its (cell, colour) pairs that no other image has at that cell."""
    owners: dict[tuple[int, str], list[int]] = {}
    for k, image in enumerate(images):
        for c, colour in enumerate(image.cells):
            owners.setdefault((c, colour), []).append(k)
    unique: dict[int, list[tuple[int, str]]] = {}
    for (c, colour), ks in owners.items():
        if len(ks) == 1:
            unique.setdefault(ks[0], []).append((c, colour))
    return unique


def heldout_prompts(
    n_images: int,
    contexts: int,
    kinds: Iterable[str] = TASK_KINDS,
    seed: int = HELDOUT_SEED,
    config: TaskConfig | None = None,
) -> list[TaskPrompt]:
    """A fixed held-out set: ``contexts`` contexts of ``n_images`` images, one prompt per kind on each.

    The set depends only on its arguments (the seed defaults to :data:`HELDOUT_SEED`, never used
    in training; ``n_images`` is mixed into it so sets of different sizes are independent).
    """
    gen = TaskGenerator(seed=seed * 1000 + n_images, config=config or TaskConfig())
    kinds = tuple(kinds)
    prompts: list[TaskPrompt] = []
    for _ in range(contexts):
        prompts.extend(gen.prompts_per_context(n_images, kinds))
    return prompts


def answer_from_prompt(words: Sequence[str], images: Sequence[ColourGrid]) -> str:
    """Answer a prompt from its words and images alone (an independent check of the generator).

    ``words`` is a whole prompt (context and one question, without the answer).
    """
    images_by_index: dict[str, ColourGrid] = {}
    facts: dict[str, str] = {}
    next_image = iter(images)
    question_start = len(words)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "img" and i + 2 < len(words) and words[i + 2] == IMAGE_WORD:
            images_by_index[words[i + 1]] = next(next_image)
            i += 3
            question_start = i
        elif w == "key" and i + 4 < len(words) and words[i + 2] == "is" and words[i + 4] == ".":
            facts[words[i + 1]] = words[i + 3]
            i += 5
            question_start = i
        else:
            i += 1
    # the question is what follows the last image or fact, past any filler words
    question = list(words[question_start:])
    while question and question[0] in FILLERS:
        question.pop(0)
    if not question or question[0] not in ("colour", "which", "count", "key"):
        raise ValueError(f"no question at the end of the prompt: {' '.join(question)!r}")
    head = question[0]
    if head == "colour":
        return images_by_index[question[1]].cells[CELLS.index(question[2])]
    if head == "which":
        c, colour = CELLS.index(question[1]), question[2]
        matches = [k for k, image in images_by_index.items() if image.cells[c] == colour]
        if len(matches) != 1:
            raise ValueError(f"retrieve question {question} has {len(matches)} matching images")
        return matches[0]
    if head == "count":
        return COUNT_WORDS[images_by_index[question[1]].count(question[2])]
    return facts[question[1]]
