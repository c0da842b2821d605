"""The answer benchmark's questions (written for this repository): 303 simple questions whose answer is one
checkable word or number, in nine families, each with the accepted answer forms and four choices.

Families are generated from short tables here (nothing is downloaded): addition of two digits (81), opposites (40),
capitals (40), plurals (30), the next number (20), the next letter (20), colours (20), animal sounds (15), and the
37 multiple-choice questions of `bench/lmeval/questions.py` that no family asks already. The choices of a generated
question are its answer and three other answers of its family (seeded), in a seeded order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.lmeval.questions import QUESTIONS as LMEVAL_MC

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
                "twenty-one"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
             ("happy", "sad"), ("open", "closed"), ("wet", "dry"), ("full", "empty"), ("old", "young"),
             ("light", "dark"), ("hard", "soft"), ("tall", "short"), ("early", "late"), ("rich", "poor"),
             ("strong", "weak"), ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"), ("heavy", "light"),
             ("win", "lose"), ("push", "pull"), ("in", "out"), ("left", "right"), ("black", "white"),
             ("good", "bad"), ("first", "last"), ("buy", "sell"), ("give", "take"), ("cheap", "expensive"),
             ("inside", "outside"), ("above", "below"), ("north", "south"), ("east", "west"), ("true", "false"),
             ("start", "finish"), ("love", "hate"), ("question", "answer"), ("sweet", "sour"), ("arrive", "leave")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("England", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Austria", "Vienna"),
            ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"),
            ("India", "Delhi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Belgium", "Brussels"),
            ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
            ("Iraq", "Baghdad"), ("Cuba", "Havana"), ("Chile", "Santiago"), ("Colombia", "Bogota"),
            ("Vietnam", "Hanoi"), ("the Philippines", "Manila"), ("Indonesia", "Jakarta")]
PLURALS = [("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("man", "men"),
           ("woman", "women"), ("goose", "geese"), ("person", "people"), ("cat", "cats"), ("dog", "dogs"),
           ("box", "boxes"), ("baby", "babies"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"),
           ("city", "cities"), ("bus", "buses"), ("fox", "foxes"), ("ox", "oxen"), ("book", "books"),
           ("tree", "trees"), ("house", "houses"), ("apple", "apples"), ("church", "churches"),
           ("potato", "potatoes"), ("hero", "heroes"), ("wife", "wives"), ("life", "lives"), ("lady", "ladies"),
           ("glass", "glasses")]
COLOURS = [("a banana", "yellow"), ("grass", "green"), ("the sky on a clear day", "blue"), ("snow", "white"),
           ("coal", "black"), ("a ripe strawberry", "red"), ("a carrot", "orange"), ("milk", "white"),
           ("a lemon", "yellow"), ("a leaf in summer", "green"), ("blood", "red"), ("a crow", "black"),
           ("the sea", "blue"), ("a ripe tomato", "red"), ("a polar bear", "white"), ("chocolate", "brown"),
           ("a pumpkin", "orange"), ("a lime", "green"), ("a fire truck", "red"), ("an elephant", "grey")]
SOUNDS = [("cow", ("moo",)), ("dog", ("bark", "woof")), ("cat", ("meow", "miaow", "purr")), ("duck", ("quack",)),
          ("sheep", ("baa", "bleat")), ("pig", ("oink",)), ("lion", ("roar",)), ("horse", ("neigh",)),
          ("owl", ("hoot",)), ("snake", ("hiss",)), ("bee", ("buzz",)), ("mouse", ("squeak",)),
          ("frog", ("croak", "ribbit")), ("rooster", ("cock-a-doodle-doo", "crow")), ("wolf", ("howl",))]
LETTERS = "BCDEFGHJKLMNOPQRSTUVWXY"  # the answer is the next letter; A and I are left out (English words)


@dataclass(frozen=True)
class Item:
    family: str
    question: str
    answers: tuple[str, ...]  # accepted forms of the answer, the first one canonical
    choices: tuple[str, ...]  # four options for the multiple-choice score
    correct: int  # index of the answer in ``choices``


def _with_choices(family: str, rows: list[tuple[str, tuple[str, ...]]], seed: int) -> list[Item]:
    rng = random.Random(f"{family}:{seed}")
    canon = [answers[0] for _, answers in rows]
    items = []
    for question, answers in rows:
        others = rng.sample(sorted({c for c in canon if c not in answers}), 3)
        choices = [answers[0], *others]
        rng.shuffle(choices)
        items.append(Item(family, question, answers, tuple(choices), choices.index(answers[0])))
    return items


def _number(n: int) -> tuple[str, ...]:
    return (str(n), NUMBER_WORDS[n])


def questions(seed: int = 0) -> list[Item]:
    """All 303 items, in family order."""
    families = {
        "addition": [(f"What is {a} plus {b}?", _number(a + b)) for a in range(1, 10) for b in range(1, 10)],
        "opposite": [(f"What is the opposite of {w}?", (o,)) for w, o in OPPOSITES],
        "capital": [(f"What is the capital of {c}?", (city,)) for c, city in CAPITALS],
        "plural": [(f"What is the plural of {w}?", (p,)) for w, p in PLURALS],
        "next_number": [(f"What number comes after {n}?", _number(n + 1)) for n in range(1, 21)],
        "next_letter": [(f"Which letter of the alphabet comes after {c}?", (chr(ord(c) + 1),))
                        for c in LETTERS if chr(ord(c) + 1) not in "AI"][:20],
        "colour": [(f"What colour is {thing}?", (c, "gray") if c == "grey" else (c,)) for thing, c in COLOURS],
        "animal_sound": [(f"What sound does a {animal} make?", sounds) for animal, sounds in SOUNDS],
    }
    items = [item for family, rows in families.items() for item in _with_choices(family, rows, seed)]
    asked = {it.question for it in items}
    items += [Item("simple_mc", q, (choices[i],), tuple(choices), i) for q, choices, i in LMEVAL_MC if q not in asked]
    return items
