"""easy-vqa (PyPI ``easy-vqa``, MIT): an external VQA check that no one here wrote.

The package ships 64×64 PNG scenes of one colored shape, with 38,575 train and 9,673 test questions over
4,000 / 1,000 images and 13 answers. It gives no question type, so the category is derived from the answer:
``shape`` (circle, rectangle, triangle: chance 1/3), ``color`` (8 colors: chance 1/8) and ``yesno`` (chance 1/2;
about 74% of the questions). Questions are used as written, followed by " Answer with one word." like synthvqa.
"""
from __future__ import annotations

import random

from torch.utils.data import Dataset

from ..errors import ConfigError
from .llava import IMAGE_PLACEHOLDER, Sample
from .synthvqa import SUFFIX

SPLITS = ("train", "test")
ANSWERS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "rectangle", "triangle"),
    "color": ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow"),
    "yesno": ("yes", "no"),
}
CATEGORIES = tuple(ANSWERS)
_CATEGORY_OF = {a: c for c, answers in ANSWERS.items() for a in answers}


def answer_space(category: str) -> tuple[str, ...]:
    """The answers a question of ``category`` can have."""
    if category not in ANSWERS:
        raise ConfigError(f"unknown easy-vqa category {category!r}; choose from {', '.join(CATEGORIES)}")
    return ANSWERS[category]


def chance_level(category: str) -> float:
    """Accuracy of a uniform guess within the category's answer space."""
    return 1 / len(answer_space(category))


def category_of(answer: str) -> str:
    """The category an easy-vqa answer belongs to."""
    if answer not in _CATEGORY_OF:
        raise ConfigError(f"{answer!r} is not an easy-vqa answer; the answers are {', '.join(_CATEGORY_OF)}")
    return _CATEGORY_OF[answer]


class EasyVQA(Dataset):
    """``EasyVQA("test", n=None, seed=0)``: the package's questions as :class:`Sample`s (image loaded on access).

    ``n`` keeps a seeded random subset of n questions, in file order (the files group ~10 questions per image,
    so the first n would cover few images).
    """

    categories = CATEGORIES
    answer_space = staticmethod(answer_space)
    chance_level = staticmethod(chance_level)

    def __init__(self, split: str = "test", n: int | None = None, seed: int = 0):
        if split not in SPLITS:
            raise ConfigError(f"easy-vqa has only the splits {', '.join(SPLITS)}, not {split!r}; use one of them "
                              "(or synthvqa, which also has 'val')")
        try:
            import easy_vqa  # optional: the easy-vqa PyPI package
        except ImportError:
            raise ConfigError("the easy-vqa dataset needs the PyPI package easy-vqa; install it with "
                              "`pip install --no-deps easy-vqa`") from None
        questions, answers, image_ids = (easy_vqa.get_train_questions if split == "train"
                                         else easy_vqa.get_test_questions)()
        paths = (easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths)()
        idx = list(range(len(questions)))
        if n is not None:
            if not 1 <= n <= len(idx):
                raise ConfigError(f"easy-vqa {split} has {len(idx)} questions; ask for n between 1 and {len(idx)}, "
                                  f"not {n}")
            idx = sorted(random.Random(f"easyvqa/{seed}/{split}").sample(idx, n))
        self.split = split
        self._rows = [(i, questions[i], answers[i], paths[image_ids[i]], image_ids[i]) for i in idx]

    def __len__(self) -> int:
        return len(self._rows)

    def question_answers(self) -> list[tuple[str, str]]:
        """(``Sample.question``, ``Sample.answer``) of every sample, in order, without loading any image."""
        return [(f"{question}{SUFFIX}".strip(), answer) for _, question, answer, _, _ in self._rows]

    def __getitem__(self, index: int) -> Sample:
        i, question, answer, path, image_id = self._rows[index]
        s = Sample(id=f"easyvqa-{self.split}-{i}", images=[path],
                   conversations=[{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}{SUFFIX}"},
                                  {"from": "gpt", "value": answer}],
                   category=category_of(answer), answer=answer, meta={"image_id": image_id})
        s.images = s.load_images()
        return s
