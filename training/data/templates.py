"""Template texts: statements (ASR), questions to the assistant, and non-queries (state 2).

Each template yields all combinations of its slots in a fixed order; `texts.py` draws from the
templates evenly (so one large template does not crowd out the others) with the run's seed.
Texts are written as they are spoken: no digits, no symbols.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

CITIES = ("Paris", "London", "Tokyo", "Chicago", "Madrid", "Berlin", "Toronto", "Sydney", "Denver",
          "Boston", "Seattle", "Dublin", "Rome", "Cairo", "Lisbon", "Oslo", "Vienna", "Miami")
WHEN = ("today", "tomorrow", "this weekend", "tonight", "on Monday", "next week", "this afternoon")
COUNTRIES = ("France", "Japan", "Canada", "Brazil", "Kenya", "Norway", "Egypt", "Peru", "Italy",
             "Spain", "Mexico", "India", "Chile", "Greece", "Sweden", "Poland", "Turkey", "Ghana")
TASKS = ("boil an egg", "make pancakes", "change a flat tire", "plant tomatoes", "clean a cast iron pan",
         "tie a tie", "fix a leaky faucet", "bake bread", "train a puppy", "save money",
         "learn to swim", "fall asleep faster", "remove a coffee stain", "start running",
         "make cold brew coffee", "write a cover letter", "keep basil alive", "fold a fitted sheet")
ANIMALS = ("cats", "dogs", "owls", "bees", "dolphins", "penguins", "horses", "frogs", "whales",
           "parrots", "elephants", "octopuses", "wolves", "squirrels", "bats", "turtles")
TOPICS = ("the moon", "volcanoes", "the ocean", "dinosaurs", "rainbows", "the human heart",
          "electricity", "honey", "the pyramids", "snowflakes", "thunder", "coffee", "glaciers",
          "the stars", "chocolate", "earthquakes", "bread", "the desert")
THINGS = ("book", "movie", "podcast", "board game", "recipe", "song", "hiking trail", "restaurant")
PURPOSES = ("a rainy day", "a long flight", "a family dinner", "the weekend", "a road trip",
            "a birthday party", "a quiet evening", "my kids")
WORDS = ("serendipity", "ephemeral", "ubiquitous", "melancholy", "resilient", "nostalgia",
         "pragmatic", "eloquent", "meticulous", "whimsical", "candid", "frugal")
UNIT_PAIRS = (("minutes", "hour"), ("days", "week"), ("months", "year"), ("inches", "foot"),
              ("ounces", "pound"), ("seconds", "minute"), ("centimeters", "meter"),
              ("cups", "quart"), ("feet", "mile"), ("grams", "kilogram"))
PAIRS = (("a frog", "a toad"), ("weather", "climate"), ("a virus", "bacteria"),
         ("baking soda", "baking powder"), ("a lake", "a pond"), ("a crocodile", "an alligator"),
         ("jam", "jelly"), ("a hurricane", "a tornado"), ("a rabbit", "a hare"),
         ("a violin", "a viola"), ("a meteor", "a comet"), ("a moth", "a butterfly"))
ITEMS = ("a pharmacy", "a gas station", "a coffee shop", "a bakery", "a hardware store",
         "a library", "a post office", "a park", "a bike shop", "an Italian restaurant")
PHRASES = ("thank you", "good morning", "where is the station", "how are you", "good night",
           "I am hungry", "see you later", "excuse me")
LANGUAGES = ("Spanish", "French", "German", "Italian", "Japanese", "Portuguese", "Dutch")
DURATIONS = ("five minutes", "ten minutes", "twenty minutes", "half an hour", "an hour",
             "two hours", "forty five minutes")
MEALS = ("breakfast", "lunch", "dinner", "a snack", "dessert")
NAMES = ("Tom", "Anna", "Mike", "Sarah", "David", "Emma", "Jack", "Lucy", "Peter", "Maria",
         "Sam", "Kate", "Ben", "Olivia", "Mom", "Dad", "Grandma", "honey")
PEOPLE = ("My sister", "My neighbor", "Our teacher", "The doctor", "My brother", "My friend",
          "The manager", "Our dog", "My uncle", "The baker", "My cousin", "The pilot")
PAST_ACTS = ("bought a new bicycle", "painted the fence", "lost the car keys", "baked a lemon cake",
             "fixed the old radio", "planted roses in the garden", "read three books",
             "missed the early train", "cleaned the whole kitchen", "found a wallet on the bus",
             "learned to play the guitar", "visited the museum", "ran a long race",
             "cooked soup for everyone", "forgot the umbrella", "moved to a bigger flat")
TIMES = ("yesterday", "last week", "on Sunday", "this morning", "last summer", "in the evening",
         "two days ago", "after lunch")
PLACES = ("the beach", "the mountains", "the market", "the cinema", "the lake", "the zoo",
          "the old town", "the stadium", "the farm", "the harbor")
SCENES = ("The kitchen smells of fresh bread", "The train was late again",
          "The river is very calm", "The children are playing outside", "The meeting ran long",
          "The garden needs more water", "The coffee is still too hot", "The shop closes early",
          "The streets were full of people", "The printer is out of paper",
          "The wind is getting stronger", "The soup needs a little salt")
TAILS = ("this morning", "today", "again", "after the rain", "as usual", "for some reason",
         "at the moment", "by the evening")

DISHES = ("a vegetable curry", "tomato soup", "a chicken salad", "banana bread", "fried rice",
          "a mushroom risotto", "apple pie", "fish tacos", "pea soup", "a cheese omelet")
VEHICLES = ("train", "bus", "ferry", "plane", "night train", "coach")
CLOCK = ("half past seven", "noon", "a quarter to nine", "six in the morning", "ten past four",
         "midnight", "eleven thirty", "twenty to three")
ACTIVITIES = ("playing tennis", "painting the kitchen", "watching a film", "walking the dog",
              "learning French", "fixing the car", "baking cookies", "cleaning the garage")
OPINIONS = ("the new library is beautiful", "this winter will be cold", "we should leave early",
            "the film was too long", "the soup tastes better with pepper", "cats are easier than dogs",
            "the bus is faster than the train", "spring is the best season", "that shop is too expensive",
            "the concert starts later than usual", "she will win the race", "it might snow tonight")

BACKCHANNELS = ("Mm-hm.", "Uh-huh.", "Okay.", "Yeah.", "Right.", "I see.", "Sure.", "Got it.",
                "Yes.", "Oh, really.", "Alright.", "Okay, okay.", "Yeah, yeah.", "Exactly.",
                "Hmm, okay.", "Oh, nice.", "Cool.", "Fair enough.", "True.", "Oh, wow.")
FILLERS = ("Um.", "Uh.", "Hmm.", "Well.", "Let me think.", "You know.", "Um, so.", "Uh, wait.",
           "Er.", "Hmm, let me see.", "Well, um.", "So, uh.")
ASIDES = ("Hold on, I'm on the phone.", "Wait a second.", "Just a moment.", "Hang on.",
          "Sorry, not you.", "Give me a minute.", "One sec.", "I'm talking to someone else.",
          "Never mind.", "Hold on a second.", "Not now.", "Sorry, I was talking to my friend.",
          "Hang on, someone is at the door.", "Just a sec, I'm on a call.")
TO_OTHERS = ("can you pass the salt?", "dinner is ready.", "where did you put my keys?",
             "are you coming with us?", "turn off the lights, please.", "did you feed the dog?",
             "I'll be there in a minute.", "can you close the window?", "have you seen my phone?",
             "we need to leave soon.", "could you grab some milk on the way home?",
             "don't forget your jacket.", "what time is the game?", "the kettle is boiling.",
             "can you help me with this box?", "please be quiet for a moment.")


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def question_families() -> list[list[str]]:
    """Questions and requests to the assistant, one list per template (end in '?' or '.')."""
    return _families(_question_lines())


def statement_families() -> list[list[str]]:
    """Plain declarative sentences for speech recognition, one list per template (end in '.')."""
    return _families(_statement_lines())


def question_texts() -> list[str]:
    return [text for family in question_families() for text in family]


def statement_texts() -> list[str]:
    return [text for family in statement_families() for text in family]


def _families(lines: Iterator[Iterator[str]]) -> list[list[str]]:
    return [list(family) for family in lines]


def _question_lines() -> Iterator[Iterator[str]]:
    yield (f"What's the weather like in {c} {w}?" for c, w in itertools.product(CITIES, WHEN))
    yield (f"Is it going to rain in {c} {w}?" for c, w in itertools.product(CITIES, WHEN))
    yield (f"What is the capital of {c}?" for c in COUNTRIES)
    yield (f"What language do people speak in {c}?" for c in COUNTRIES)
    yield (f"How do I {t}?" for t in TASKS)
    yield (f"How long does it take to {t}?" for t in TASKS)
    yield (f"Can you explain how to {t}?" for t in TASKS)
    yield (f"Tell me a fun fact about {a}." for a in ANIMALS + TOPICS)
    yield (f"Why do {a} sleep so much?" for a in ANIMALS)
    yield (f"What do {a} eat?" for a in ANIMALS)
    yield (f"How long do {a} live?" for a in ANIMALS)
    yield (f"Can you tell me something about {t}?" for t in TOPICS)
    yield (f"Could you recommend a good {t} for {p}?" for t, p in itertools.product(THINGS, PURPOSES))
    yield (f"What does the word {w} mean?" for w in WORDS)
    yield (f"How many {a} are in a {b}?" for a, b in UNIT_PAIRS)
    yield (f"What is the difference between {a} and {b}?" for a, b in PAIRS)
    yield (f"Where can I find {i} near me?" for i in ITEMS)
    yield (f"How do you say {p} in {lang}?" for p, lang in itertools.product(PHRASES, LANGUAGES))
    yield (f"Can you set a timer for {d}?" for d in DURATIONS)
    yield (f"Remind me to call {n} in {d}." for n, d in itertools.product(NAMES[:12], DURATIONS))
    yield (f"What should I cook for {m} {w}?" for m, w in itertools.product(MEALS, WHEN))
    yield (f"Can you give me a quick idea for {m}?" for m in MEALS)


def _statement_lines() -> Iterator[Iterator[str]]:
    yield (f"{p} {a} {t}." for p, a, t in itertools.product(PEOPLE, PAST_ACTS, TIMES))
    yield (f"{s} {t}." for s, t in itertools.product(SCENES, TAILS))
    yield (f"We are going to {p} {w}." for p, w in itertools.product(PLACES, WHEN))
    yield (f"{n} lives near {p} in {c}." for n, p, c in itertools.product(NAMES[:14], PLACES, CITIES))
    yield (f"{_capitalize(a)} are my favorite animals." for a in ANIMALS)
    yield (f"I learned a lot about {t} {w}." for t, w in itertools.product(TOPICS, TIMES))
    yield (f"{n} is making {d} for {m} {w}."
           for n, d, m, w in itertools.product(NAMES[:10], DISHES, MEALS, WHEN))
    yield (f"The {v} to {c} leaves at {t}." for v, c, t in itertools.product(VEHICLES, CITIES, CLOCK))
    yield (f"{a} and {b} are {act} {w}." for (a, b), act, w in
           itertools.product(itertools.combinations(NAMES[:8], 2), ACTIVITIES, WHEN))
    yield (f"I think {o}." for o in OPINIONS)


def nonquery_texts() -> dict[str, tuple[str, ...]]:
    """Speech that must not be answered, by sub-kind (backchannel, filler, aside, to_other)."""
    to_others = tuple(f"{n}, {r}" for n, r in itertools.product(NAMES, TO_OTHERS))
    return {"backchannel": BACKCHANNELS, "filler": FILLERS, "aside": ASIDES, "to_other": to_others}
