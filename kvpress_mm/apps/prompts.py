"""Prompts for the commands: interleaved text and images, and the built-in synthetic prompt set.

A :class:`Prompt` is a sequence of parts, each a string or a PIL image, in reading order;
:func:`kvpress_mm.apps.models.encode` turns it into model inputs with the model's own processor
(each image becomes the processor's image placeholder tokens). The built-in prompts are
"galleries": several synthetic pictures (coloured shapes on coloured backgrounds, drawn with
PIL, nothing downloaded), each introduced by a sentence describing it, then a question about
one of them. The vocabulary is small and plain English, so the same prompts work on the
random-weight tiny LLaVA of :mod:`kvpress_mm.apps.embedded_model` (whose word-level tokenizer is
built from :data:`VOCABULARY`) and on a real model. (The reference VLM reads only its task
language: ``kvpress-mm bench fidelity`` gives it held-out task prompts instead,
:func:`kvpress_mm.apps.bench.fidelity.reference_prompts`.)

```python
from kvpress_mm.apps.prompts import gallery_prompt

prompt = gallery_prompt(n_images=6, seed=0)
print(prompt.text_with("<image>"))
```
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
SHAPES = ("square", "circle", "triangle", "cross", "stripe")
SIZES = ("small", "large")
PLACES = ("left", "right", "top", "bottom", "center")

#: Words the built-in prompts use; the random tiny LLaVA's tokenizer vocabulary is built from it.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *COLOURS,
            *SHAPES,
            *SIZES,
            *PLACES,
            *(str(n) for n in range(0, 33)),
            *"""you are given photos photo picture pictures image images . , : ? ! a an the of on in at with
            and or is are was which what where how many shows show has have there this that it its one two
            three four five six seven eight nine ten background field shape shapes colour color side near
            far corner look carefully describe each then answer question answer: question: first last
            next before after same different some no yes not only also both all every part note key value
            for to from by as be see seen find found remember number text about left: right: above below
            middle bright dark light pale deep plain simple drawing drawn scene small-ish user assistant
            system please short word words name named called between other""".split(),
        ]
    )
)


@dataclass
class Prompt:
    """A prompt of interleaved text and images, in reading order.

    Attributes:
        parts: strings and PIL images; consecutive strings are simply concatenated.
        name: a short label (shown in tables and JSON).
        answer: the expected answer, when the prompt has one (informational).

    """

    parts: list[str | Image]
    name: str = "prompt"
    answer: str | None = field(default=None)

    @property
    def images(self) -> list[Image]:
        """The images, in order."""
        return [part for part in self.parts if not isinstance(part, str)]

    def text_with(self, image_token: str) -> str:
        """The text with each image replaced by ``image_token``."""
        return "".join(part if isinstance(part, str) else image_token for part in self.parts)

    @classmethod
    def from_text(
        cls, text: str, images: Sequence[Image] = (), marker: str | None = None, name: str = "prompt"
    ) -> Prompt:
        """A prompt from text and images.

        With ``marker`` present in ``text`` (e.g. ``"<image>"``), each occurrence is where the
        next image goes and their count must equal ``len(images)``; otherwise the images come
        first, each on its own line, then the text.

        Raises:
            ValueError: the markers and the images do not match in number.

        """
        if marker and marker in text:
            pieces = text.split(marker)
            if len(pieces) - 1 != len(images):
                raise ValueError(
                    f"the prompt has {len(pieces) - 1} image marker(s) {marker!r} but {len(images)} image(s) were given"
                )
            parts: list[str | Image] = [pieces[0]]
            for image, piece in zip(images, pieces[1:]):
                parts += [image, piece]
            return cls([p for p in parts if not (isinstance(p, str) and p == "")], name=name)
        parts = []
        for image in images:
            parts += [image, "\n"]
        parts.append(text)
        return cls(parts, name=name)


def synthetic_image(
    colour: str, shape: str, background: str, size: str = "large", place: str = "center", pixels: int = 336
) -> Image:
    """A ``pixels`` x ``pixels`` RGB picture: a ``colour`` ``shape`` on a ``background`` field."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    image = PILImage.new("RGB", (pixels, pixels), COLOURS[background])
    draw = ImageDraw.Draw(image)
    extent = pixels * (0.6 if size == "large" else 0.3)
    centres = {
        "center": (0.5, 0.5),
        "left": (0.3, 0.5),
        "right": (0.7, 0.5),
        "top": (0.5, 0.3),
        "bottom": (0.5, 0.7),
    }
    cx, cy = (c * pixels for c in centres[place])
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=fill)
    elif shape == "cross":
        bar = extent / 5
        draw.rectangle((box[0], cy - bar, box[2], cy + bar), fill=fill)
        draw.rectangle((cx - bar, box[1], cx + bar, box[3]), fill=fill)
    else:  # stripe
        draw.rectangle((box[0], cy - extent / 8, box[2], cy + extent / 8), fill=fill)
    return image


@dataclass(frozen=True)
class _Picture:
    colour: str
    shape: str
    background: str
    size: str
    place: str

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.place} , on a {self.background} background"


def _pictures(n: int, rng: random.Random) -> list[_Picture]:
    colours = list(COLOURS)
    pictures = []
    for _ in range(n):
        colour, background = rng.sample(colours, 2)
        pictures.append(_Picture(colour, rng.choice(SHAPES), background, rng.choice(SIZES), rng.choice(PLACES)))
    return pictures


def gallery_prompt(n_images: int = 6, seed: int = 0, image_pixels: int = 336) -> Prompt:
    """A gallery of ``n_images`` described synthetic pictures, then a question about one of them.

    ``image_pixels`` is the drawn size; the model's processor resizes it anyway.
    """
    if n_images < 1:
        raise ValueError(f"a gallery needs at least 1 image, got {n_images}")
    rng = random.Random(seed)
    pictures = _pictures(n_images, rng)
    parts: list[str | Image] = [f"you are given {n_images} photos . look carefully at each photo .\n"]
    for index, picture in enumerate(pictures, start=1):
        image = synthetic_image(
            picture.colour, picture.shape, picture.background, picture.size, picture.place, image_pixels
        )
        parts += [f"photo {index} : ", image, f" this photo shows {picture.describe()} .\n"]
    kind = rng.choice(("which", "what", "where"))
    target_index = rng.randrange(n_images)
    target = pictures[target_index]
    if kind == "which":
        question = f"question : which photo shows a {target.colour} {target.shape} ?"
        answer = str(target_index + 1)
    elif kind == "what":
        question = f"question : what shape is in photo {target_index + 1} ?"
        answer = target.shape
    else:
        question = f"question : where is the {target.shape} in photo {target_index + 1} ?"
        answer = target.place
    parts.append(f"{question} answer :")
    return Prompt(parts, name=f"gallery-{n_images}-s{seed}", answer=answer)


def text_prompt(n_facts: int = 24, seed: int = 0) -> Prompt:
    """A text-only prompt: a list of ``key K is V`` facts, then a question about one of them."""
    rng = random.Random(seed)
    keys = rng.sample(range(1, 33), min(n_facts, 32))
    values = [rng.choice(list(COLOURS)) for _ in keys]
    lines = ["remember each key and its colour .\n"]
    lines += [f"key {k} is {v} .\n" for k, v in zip(keys, values)]
    target = rng.randrange(len(keys))
    lines.append(f"question : what colour is key {keys[target]} ? answer :")
    return Prompt(["".join(lines)], name=f"facts-{len(keys)}-s{seed}", answer=values[target])


def builtin_prompts(multimodal: bool, count: int = 4, seed: int = 0) -> list[Prompt]:
    """The built-in prompt set: galleries of 4 to 10 images (multimodal), or fact lists (text)."""
    if multimodal:
        return [gallery_prompt(n_images=4 + 2 * (i % 4), seed=seed + i) for i in range(count)]
    return [text_prompt(n_facts=16 + 4 * (i % 4), seed=seed + i) for i in range(count)]
