"""Hand-written data of the real-model lab (SmolLM2-135M-Instruct): probe candidates, tasks.

**Knowledge probe candidates** (:data:`PROBE_CANDIDATES`, a few hundred ``(prompt,
answer)`` pairs in five formats). Only the items the base answers correctly before any
training are kept (:func:`secura_plugins.lab.real.knowledge_probe`), so the probe measures
what *this* base really knows:

* ``capital``: ``"The capital of France is"`` -> ``" Paris"``;
* ``country``: ``"Lyon is a city in"`` -> ``" France"``;
* ``language``: ``"The official language of Brazil is"`` -> ``" Portuguese"``;
* ``opposite`` / ``plural``: word relations (``"The opposite of hot is"`` -> ``" cold"``);
* ``sequence``: short "continue the list" instructions
  (``"Monday, Tuesday, Wednesday,"`` -> ``" Thursday"``);
* ``chat``: short questions through the model's chat template, answered by one sentence.

**Tasks** (:data:`REAL_TASKS`), what users fine-tune a small instruct model on:

* ``facts-same``: capitals of new, fictional countries asked in *the probe's own* capital
  format (``"The capital of Velmora is"`` -> ``" Denver"``): the hard case, where learning the
  new answers competes directly with the known ones;
* ``facts-other``: new fictional people's jobs in another (Q/A) format;
* ``json``: a skill, an output format (``"name Anna, city Lyon"`` -> JSON), evaluated on
  held-out names;
* ``chat-initials``: a skill in chat format through the chat template (the initials of a
  full name), evaluated on held-out names.

Fictional names are built from fixed syllables with a seeded RNG, so they are stable and
never collide with the probe. Fact tasks are evaluated on the same facts (asked again, as
in the issue); skills on held-out inputs.

Example:
    >>> from secura_plugins.lab.real_data import REAL_TASKS, task_examples
    >>> list(REAL_TASKS)
    ['facts-same', 'facts-other', 'json', 'chat-initials']
    >>> task_examples("facts-same", 2)[0]
    {'prompt': 'The capital of Normania is', 'completion': ' Wichita'}
"""

from __future__ import annotations

import random
from typing import Any

__all__ = [
    "CHAT_FORMATS",
    "PROBE_CANDIDATES",
    "REAL_TASKS",
    "probe_candidates",
    "task_examples",
]

_CAPITALS = """France Paris|Japan Tokyo|Italy Rome|Germany Berlin|Spain Madrid|Russia Moscow|
China Beijing|Egypt Cairo|Greece Athens|Portugal Lisbon|England London|Ireland Dublin|
Austria Vienna|Poland Warsaw|Norway Oslo|Sweden Stockholm|Finland Helsinki|Denmark Copenhagen|
Hungary Budapest|Canada Ottawa|Australia Canberra|Kenya Nairobi|Peru Lima|Chile Santiago|
Cuba Havana|Thailand Bangkok|Vietnam Hanoi|Iran Tehran|Iraq Baghdad|Turkey Ankara|
Belgium Brussels|Argentina Buenos Aires|Mexico Mexico City|India New Delhi|Indonesia Jakarta|
Philippines Manila|Colombia Bogota|Venezuela Caracas|Ukraine Kyiv|Romania Bucharest|
Czech Republic Prague|Switzerland Bern|Netherlands Amsterdam|Scotland Edinburgh|Wales Cardiff|
Nigeria Abuja|Ethiopia Addis Ababa|Morocco Rabat|South Korea Seoul|Afghanistan Kabul|
Pakistan Islamabad|Saudi Arabia Riyadh|Israel Jerusalem|Lebanon Beirut|Syria Damascus|
Jordan Amman|Bulgaria Sofia|Serbia Belgrade|Croatia Zagreb|Iceland Reykjavik"""

_CITY_COUNTRY = """Lyon France|Marseille France|Milan Italy|Naples Italy|Venice Italy|
Munich Germany|Hamburg Germany|Barcelona Spain|Seville Spain|Osaka Japan|Kyoto Japan|
Shanghai China|Toronto Canada|Vancouver Canada|Montreal Canada|Sydney Australia|
Melbourne Australia|Mumbai India|Chicago the United States|Boston the United States|
Manchester England|Liverpool England|Glasgow Scotland|Porto Portugal|St Petersburg Russia|
Krakow Poland|Istanbul Turkey|Rio de Janeiro Brazil|Sao Paulo Brazil|Alexandria Egypt|
Casablanca Morocco|Zurich Switzerland|Geneva Switzerland|Rotterdam the Netherlands|
Antwerp Belgium|Gothenburg Sweden|Bergen Norway|Auckland New Zealand|Cape Town South Africa|
Johannesburg South Africa"""

_LANGUAGES = """France French|Germany German|Spain Spanish|Italy Italian|Japan Japanese|
China Chinese|Russia Russian|Portugal Portuguese|Brazil Portuguese|Greece Greek|
Turkey Turkish|Poland Polish|Sweden Swedish|Norway Norwegian|Finland Finnish|
Denmark Danish|Hungary Hungarian|the Netherlands Dutch|Mexico Spanish|Argentina Spanish|
Egypt Arabic|Saudi Arabia Arabic|Iran Persian|Israel Hebrew|Korea Korean|Vietnam Vietnamese|
Thailand Thai|Ukraine Ukrainian|Romania Romanian|Austria German"""

_OPPOSITES = """hot cold|big small|up down|good bad|fast slow|light dark|happy sad|old new|
rich poor|open closed|left right|black white|high low|hard soft|strong weak|early late|
wet dry|full empty|long short|thick thin|love hate|true false|win lose|day night|
north south|east west|young old|heavy light|loud quiet|clean dirty|first last|
inside outside|push pull|buy sell|near far|before after|above below|top bottom|
start finish|cheap expensive|easy difficult|alive dead|friend enemy|question answer|
sweet sour|war peace|always never|male female|positive negative|increase decrease"""

_PLURALS = """mouse mice|child children|man men|woman women|tooth teeth|foot feet|
goose geese|person people|cat cats|dog dogs|box boxes|city cities|baby babies|
leaf leaves|knife knives|wolf wolves|life lives|ox oxen|cactus cacti|fungus fungi|
sheep sheep|fish fish|deer deer|bus buses|church churches|potato potatoes|
tomato tomatoes|hero heroes|book books|apple apples|car cars|house houses|
dish dishes|wife wives|half halves|knee knees|party parties|story stories|
crisis crises|analysis analyses"""

_SEQUENCES = [
    ("Monday, Tuesday, Wednesday,", " Thursday"),
    ("Tuesday, Wednesday, Thursday,", " Friday"),
    ("Thursday, Friday, Saturday,", " Sunday"),
    ("January, February, March,", " April"),
    ("March, April, May,", " June"),
    ("June, July, August,", " September"),
    ("September, October, November,", " December"),
    ("one, two, three,", " four"),
    ("four, five, six,", " seven"),
    ("seven, eight, nine,", " ten"),
    ("first, second, third,", " fourth"),
    ("1, 2, 3, 4,", " 5"),
    ("2, 4, 6, 8,", " 10"),
    ("10, 20, 30, 40,", " 50"),
    ("A, B, C, D,", " E"),
    ("a, b, c, d,", " e"),
    ("spring, summer, autumn,", " winter"),
    ("red, orange, yellow, green,", " blue"),
    ("Mercury, Venus, Earth,", " Mars"),
    ("do, re, mi,", " fa"),
    ("Repeat the word apple: apple, apple,", " apple"),
    ("Count down: five, four, three,", " two"),
    ("Say hello in Spanish:", " Hola"),
    ("Say thank you in French:", " Merci"),
    ("Say goodbye in Italian:", " Ciao"),
    ("Spell the word cat letter by letter: c,", " a"),
    ("Write the number twelve in digits:", " 12"),
    ("Write the number seven in digits:", " 7"),
    ("Write 100 in words:", " one hundred"),
    ("The first letter of the alphabet is", " A"),
]

_CHAT = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Russia?", "The capital of Russia is Moscow."),
    ("What is the capital of China?", "The capital of China is Beijing."),
    ("What is the capital of Greece?", "The capital of Greece is Athens."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon."),
    ("What is the capital of England?", "The capital of England is London."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("What is the opposite of happy?", "The opposite of happy is sad."),
    ("What is the opposite of fast?", "The opposite of fast is slow."),
    ("What is the plural of mouse?", "The plural of mouse is mice."),
    ("What is the plural of child?", "The plural of child is children."),
    ("What language is spoken in France?", "French"),
    ("What language is spoken in Germany?", "German"),
    ("What color is the sky on a clear day?", "The sky is blue"),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What is the chemical symbol for water?", "The chemical symbol for water is H2O."),
    ("What is the freezing point of water in Celsius?", "0 degrees Celsius"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the boiling point of water in Celsius?", "100 degrees Celsius"),
    ("How many continents are there?", "There are 7 continents"),
]


def _pairs(block: str) -> list[tuple[str, str]]:
    """``"a b|c d"`` -> ``[("a", "b"), ...]``, splitting each item at its *last* space
    for two-word keys ("Buenos Aires" values are handled by :data:`_TWO_WORD`)."""
    out = []
    for item in block.replace("\n", "").split("|"):
        item = item.strip()
        if item:
            out.append(_split(item))
    return out


#: Multi-word names: the split point is after these keys / before these values.
_TWO_WORD = (
    "Buenos Aires",
    "Mexico City",
    "New Delhi",
    "Addis Ababa",
    "Czech Republic",
    "South Korea",
    "Saudi Arabia",
    "St Petersburg",
    "Rio de Janeiro",
    "Sao Paulo",
    "Cape Town",
    "the United States",
    "the Netherlands",
    "New Zealand",
    "South Africa",
)


def _split(item: str) -> tuple[str, str]:
    for name in _TWO_WORD:
        if item.startswith(name + " "):
            return name, item[len(name) + 1 :]
        if item.endswith(" " + name):
            return item[: -len(name) - 1], name
    key, _, value = item.partition(" ")
    return key, value


#: Chat-format items: (user message, assistant answer). Rendered by the chat template.
CHAT_FORMATS = ("chat",)


def probe_candidates() -> dict[str, list[tuple[str, str]]]:
    """Candidate probe items per format (prompts are plain text, answers start with a space,
    except ``chat`` whose prompts are user messages and answers the assistant's reply)."""
    return {
        "capital": [(f"The capital of {c} is", f" {v}") for c, v in _pairs(_CAPITALS)],
        "country": [(f"{c} is a city in", f" {v}") for c, v in _pairs(_CITY_COUNTRY)],
        "language": [
            (f"The official language of {c} is", f" {v}") for c, v in _pairs(_LANGUAGES)
        ],
        "opposite": [(f"The opposite of {a} is", f" {b}") for a, b in _pairs(_OPPOSITES)],
        "plural": [(f"The plural of {a} is", f" {b}") for a, b in _pairs(_PLURALS)],
        "sequence": list(_SEQUENCES),
        "chat": list(_CHAT),
    }


PROBE_CANDIDATES = probe_candidates()

# ---------------------------------------------------------------- fictional tasks
_ON = ["Vel", "Nor", "Dun", "Kar", "Tal", "Mor", "Zan", "Quel", "Bra", "Sil", "Fen", "Gor",
       "Hal", "Tor", "Ves", "Lum", "Pry", "Ost", "Dra", "Cal"]
_MID = ["ma", "va", "ri", "do", "le", "the", "qua", "mi", "ro", "na", "sha", "ko"]
_END_C = ["nia", "ria", "dor", "mia", "land", "stan", "vey", "lis"]
_FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines",
          "Jonas", "Kira", "Luca", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Sven", "Tara",
          "Uma", "Viktor", "Wanda", "Xavier", "Yara", "Zeno", "Ada", "Bruno", "Cora",
          "Dario", "Edda", "Felix", "Gina"]
_LAST = ["Tellik", "Moravec", "Quist", "Brandt", "Ostrova", "Vance", "Harlow", "Dimas",
         "Kessler", "Lund", "Petrov", "Rask", "Solberg", "Varga", "Weller", "Yilmaz"]
_JOBS = ["baker", "pilot", "farmer", "nurse", "teacher", "lawyer", "painter", "sailor",
         "dentist", "chef", "miner", "tailor", "judge", "poet", "plumber", "banker"]
_CITIES = ["Lyon", "Oslo", "Lima", "Cairo", "Porto", "Kyoto", "Perth", "Quito", "Riga",
           "Turin", "Dakar", "Hanoi", "Seoul", "Bern", "Malmo", "Graz", "Ghent", "Bonn"]


def _fictional(rng: random.Random, ends: list[str], used: set[str]) -> str:
    while True:
        name = rng.choice(_ON) + rng.choice(_MID) + rng.choice(ends)
        if name not in used:
            used.add(name)
            return name


def _people(rng: random.Random, n: int, first: list[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = f"{rng.choice(first)} {rng.choice(_LAST)}"
        if name not in names:
            names.append(name)
    return names


#: Answers of the new capitals: real one-word town names the probe never uses, so a new
#: fact is an association to learn (as when a real model learns about a new entity), not
#: a new word to spell.
_TOWNS = ["Denver", "Dallas", "Austin", "Phoenix", "Houston", "Seattle", "Portland", "Miami",
          "Atlanta", "Detroit", "Memphis", "Nashville", "Orlando", "Tampa", "Omaha", "Tucson",
          "Fresno", "Reno", "Boise", "Salem", "Dover", "Albany", "Trenton", "Richmond",
          "Raleigh", "Jackson", "Lincoln", "Madison", "Topeka", "Helena", "Juneau", "Dayton",
          "Toledo", "Akron", "Buffalo", "Newark", "Oakland", "Tulsa", "Wichita", "Spokane"]


def _facts_same(n: int, seed: int) -> list[dict[str, Any]]:
    if n > len(_TOWNS):
        raise ValueError(f"n: facts-same has at most {len(_TOWNS)} facts, got {n}")
    rng, used = random.Random(f"facts-same:{seed}"), set()
    towns = rng.sample(_TOWNS, n)
    rows = []
    for town in towns:
        country = _fictional(rng, _END_C, used)
        rows.append({"prompt": f"The capital of {country} is", "completion": f" {town}"})
    return rows


def _facts_other(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"facts-other:{seed}")
    rows = []
    for name in _people(rng, n, _FIRST):
        job = rng.choice(_JOBS)
        rows.append({"prompt": f"Q: What is {name}'s job?\nA:", "completion": f" {job}"})
    return rows


def _json(n: int, seed: int, held_out: bool) -> list[dict[str, Any]]:
    rng = random.Random(f"json:{seed}:{held_out}")
    half = len(_FIRST) // 2
    first = _FIRST[half:] if held_out else _FIRST[:half]
    cities = _CITIES[len(_CITIES) // 2 :] if held_out else _CITIES[: len(_CITIES) // 2]
    rows = []
    for _ in range(n):
        name, city = rng.choice(first), rng.choice(cities)
        rows.append(
            {
                "prompt": f"Format as JSON: name {name}, city {city}\nJSON:",
                "completion": f' {{"name": "{name}", "city": "{city}"}}',
            }
        )
    return rows


def _initials(n: int, seed: int, held_out: bool) -> list[dict[str, Any]]:
    rng = random.Random(f"initials:{seed}:{held_out}")
    half = len(_FIRST) // 2
    first = _FIRST[half:] if held_out else _FIRST[:half]
    rows = []
    for _ in range(n):
        a, b = rng.choice(first), rng.choice(first)
        last = rng.choice(_LAST)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Initials of {a} {b} {last}?"}],
                "completion": [{"role": "assistant", "content": f"{a[0]}.{b[0]}.{last[0]}."}],
            }
        )
    return rows


#: Task tag -> (kind, one-line description). Kind "facts": evaluated on the trained facts;
#: "skill": on held-out inputs.
REAL_TASKS: dict[str, tuple[str, str]] = {
    "facts-same": ("facts", "new fictional capitals, in the probe's own capital format"),
    "facts-other": ("facts", "new fictional people's jobs, Q/A format"),
    "json": ("skill", "format 'name, city' as JSON (held-out names and cities)"),
    "chat-initials": ("skill", "chat: the initials of a full name (held-out names)"),
}


def task_examples(
    tag: str, n: int, seed: int = 0, *, held_out: bool = False
) -> list[dict[str, Any]]:
    """``n`` rows of task ``tag`` (TRL prompt-completion rows; chat rows are message lists).

    Fact tasks ignore ``held_out`` (the eval asks the trained facts again); skills draw
    held-out inputs from a disjoint half of the names.
    """
    if tag not in REAL_TASKS:
        raise ValueError(f"tag: unknown real-lab task {tag!r}; choose one of {', '.join(REAL_TASKS)}")
    if tag == "facts-same":
        return _facts_same(n, seed)
    if tag == "facts-other":
        return _facts_other(n, seed)
    if tag == "json":
        return _json(n, seed, held_out)
    return _initials(n, seed, held_out)
