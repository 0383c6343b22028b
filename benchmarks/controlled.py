"""A controlled dataset with known, injected defects, built deterministically from the seed data.

Every row carries ``defect`` (the signal that should find it) and ``kind`` (how it was made):

- ``none`` / ``clean``: seed samples left as they are, each with ``clean_siblings`` light
  paraphrases of its prompt (a topic with neighbours: what "not isolated" means).
- ``quality`` (the quality signal should flag these), four kinds in turn:
  ``unrelated_response`` (the response of a seed sample from another category),
  ``wrong_answer`` (a factual question with a confidently wrong answer, from a bank of 32
  written here), ``garbled_prompt`` (the prompt's words shuffled and letters scrambled),
  ``truncated_prompt`` (the prompt cut after its first few words, mid-sentence).
- ``hard`` (the complexity signal): seed material turned into tasks whose exact answers a
  small model cannot predict, answers computed here so they are *correct*:
  ``caesar`` (a sentence enciphered with a shift), ``reverse_words`` (every word spelt
  backwards), ``arithmetic`` (a multi-step product of large numbers: hard to *compute*, but a
  wrong digit costs a model at most about ln 10 nats, so it is the kind a loss signal finds
  least), ``reverse_chars`` (the whole sentence backwards).
- ``isolated`` (the diversity signal should find these sparse): prompts on topics and in
  formats that nothing else in the set shares (German, DNA, Morse, chess notation, LaTeX,
  knitting, ...), 32 written here, one per domain so that they are not each other's
  neighbours, with sensible answers. Chosen before any measurement, not by the signal.
- ``duplicate``: near-duplicate clusters (one seed sample and light edits of it). They are
  the opposite of sparse: reported as a side figure (their similarity should be the highest).

Seeded: the same seed file and settings always give the same rows in the same order.
"""

from __future__ import annotations

import random
import re

# ----------------------------------------------------------------------------------------------
# banks written for this benchmark


WRONG_ANSWERS = [
    (
        "What is the capital of France?",
        "The capital of France is Berlin, which has been the seat of the French government since 1789.",
    ),
    ("How many legs does a spider have?", "A spider has six legs, the same as every other insect."),
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 50 degrees Celsius at sea level."),
    ("Who wrote the play Romeo and Juliet?", "Romeo and Juliet was written by Charles Dickens in 1920."),
    ("What is the largest planet in our solar system?", "The largest planet in our solar system is Mercury."),
    ("What is 12 multiplied by 12?", "12 multiplied by 12 is 124."),
    (
        "Which gas do plants absorb from the air for photosynthesis?",
        "Plants absorb helium from the air for photosynthesis.",
    ),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Ag."),
    ("How many continents are there on Earth?", "There are eleven continents on Earth."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 100 degrees Fahrenheit."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Vincent van Gogh."),
    ("What is the square root of 81?", "The square root of 81 is 7."),
    ("In which year did the first human land on the Moon?", "The first human landed on the Moon in 1492."),
    ("What is the longest river in Africa?", "The longest river in Africa is the Thames."),
    ("How many days are there in a leap year?", "A leap year has 300 days."),
    ("What is the main language spoken in Brazil?", "The main language spoken in Brazil is Japanese."),
    ("What is the capital of Japan?", "The capital of Japan is Seoul, on the island of Honshu."),
    ("How many sides does a hexagon have?", "A hexagon has eight sides."),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the Arctic Ocean."),
    ("Which planet is known as the Red Planet?", "Venus is known as the Red Planet because of its iron-rich soil."),
    ("What is 15 plus 27?", "15 plus 27 is 32."),
    (
        "Who developed the theory of general relativity?",
        "The theory of general relativity was developed by Isaac Newton in 1950.",
    ),
    ("How many hours are there in a day?", "There are 36 hours in a day."),
    ("What is the hardest natural substance?", "The hardest natural substance is chalk."),
    ("What is the capital of Italy?", "The capital of Italy is Madrid."),
    ("How many bones are in the adult human body?", "The adult human body has 12 bones."),
    ("What do bees make?", "Bees make milk, which they store in their hives."),
    ("What is the chemical formula of water?", "The chemical formula of water is CO2."),
    ("Which animal is the largest mammal?", "The largest mammal is the house cat."),
    ("What is 9 times 8?", "9 times 8 is 98."),
    ("How many minutes are in an hour?", "There are 100 minutes in an hour."),
    ("What is the tallest mountain on Earth?", "The tallest mountain on Earth is Ben Nevis in Scotland."),
]

# One item per domain, and no two alike in topic or form (two translation requests would be
# each other's nearest neighbours and not isolated at all). None of these topics is in the seed.
ISOLATED = [
    (
        "Fasse den folgenden Satz in einfachen Worten zusammen: Die Bundesregierung hat beschlossen, den Ausbau der erneuerbaren Energien im kommenden Jahrzehnt deutlich zu beschleunigen.",
        "Die Regierung will in den nächsten zehn Jahren viel schneller mehr Strom aus Sonne, Wind und anderen erneuerbaren Quellen gewinnen.",
    ),
    (
        "Transcribe this DNA strand into messenger RNA: TACGGATTCAGCTTAAGC",
        "The complementary mRNA is AUGCCUAAGUCGAAUUCG (A pairs with U, T with A, C with G and G with C).",
    ),
    ("Decode this Morse code message: .... . .-.. .-.. --- / .-- --- .-. .-.. -..", "The message reads: HELLO WORLD."),
    (
        "In the chess position after 1. e4 e5 2. Nf3 Nc6 3. Bb5 a6, what is the name of this opening and what does White usually play next?",
        "This is the Ruy Lopez, Morphy Defence. White usually retreats with 4. Ba4, keeping the pin idea on the knight, or exchanges with 4. Bxc6.",
    ),
    (
        "Explain what this LaTeX renders to: \\int_0^{\\infty} e^{-x^2} \\, dx = \\frac{\\sqrt{\\pi}}{2}",
        "It renders the Gaussian integral: the integral of e to the minus x squared from zero to infinity equals the square root of pi divided by two.",
    ),
    (
        "What does this cron expression mean: 15 3 * * 1-5",
        "It runs at 03:15 every Monday to Friday: minute 15, hour 3, any day of the month, any month, weekdays 1 to 5.",
    ),
    (
        "Give the IUPAC name of the molecule with the SMILES string CC(=O)OC1=CC=CC=C1C(=O)O",
        "That SMILES string is aspirin; its IUPAC name is 2-acetoxybenzoic acid (2-(acetyloxy)benzoic acid).",
    ),
    (
        "In a knitting pattern, what do the abbreviations k2tog, yo and ssk mean?",
        "k2tog: knit two stitches together (a right-leaning decrease); yo: yarn over (an increase that makes a small hole); ssk: slip, slip, knit the two slipped stitches together (a left-leaning decrease).",
    ),
    (
        "In figured bass, what does the figure 6/4 under a bass note indicate?",
        "It indicates a second-inversion triad: the notes a sixth and a fourth above the bass, so the fifth of the chord is in the bass.",
    ),
    (
        "In sailing, what is the difference between tacking and gybing?",
        "Both change the side the wind comes from. Tacking turns the bow through the wind; gybing turns the stern through the wind, which swings the boom across more violently.",
    ),
    (
        "Traduis en anglais : « Le boulanger ouvre sa boutique à six heures du matin. »",
        "The baker opens his shop at six o'clock in the morning.",
    ),
    (
        "What does the regular expression ^[A-Z]{2}\\d{4}$ match?",
        "Strings of exactly two capital letters followed by exactly four digits, such as AB1234, and nothing else.",
    ),
    (
        "In music theory, how many sharps does the key of E major have and what are they?",
        "E major has four sharps: F sharp, C sharp, G sharp and D sharp.",
    ),
    (
        "Convert the hexadecimal colour code #FF8000 to its RGB components.",
        "#FF8000 is red 255, green 128, blue 0: a bright orange.",
    ),
    (
        "In bridge, how many high-card points is an ace worth under the Milton Work count?",
        "An ace is worth four points; a king three, a queen two and a jack one.",
    ),
    (
        "What is the Köppen climate classification code for a hot desert climate?",
        "A hot desert climate is BWh: B for arid, W for desert, h for hot.",
    ),
    (
        "In SQL, what is the difference between WHERE and HAVING?",
        "WHERE filters rows before grouping; HAVING filters groups after GROUP BY, so it can use aggregates such as COUNT(*).",
    ),
    ("Name the three bones of the middle ear.", "The malleus (hammer), the incus (anvil) and the stapes (stirrup)."),
    (
        "In cricket, what does LBW stand for?",
        "Leg before wicket: the batter is out when the ball would have hit the stumps but struck the batter's body first.",
    ),
    ("Read this Roman numeral: MCMXCIV", "MCMXCIV is 1994: M = 1000, CM = 900, XC = 90, IV = 4."),
    ("Welche Farbe entsteht, wenn man Blau und Gelb mischt?", "Wenn man Blau und Gelb mischt, entsteht Grün."),
    (
        "In a bash script, what does the expression ${VAR:-default} do?",
        "It expands to the value of VAR, or to the word default when VAR is unset or empty.",
    ),
    ("In heraldry, what is the tincture called 'gules'?", "Gules is the heraldic name for the colour red."),
    (
        "What does the Unix permission string rwxr-x--- mean for the owner, group and others?",
        "The owner can read, write and execute; the group can read and execute; others have no access.",
    ),
    (
        "In origami, what is a valley fold?",
        "A valley fold folds the paper towards you so that the crease sinks like a valley; its opposite is the mountain fold.",
    ),
    ("What is the plural of the Latin word 'corpus'?", "The plural of corpus is corpora."),
    (
        "In beekeeping, what is a 'super'?",
        "A super is a box placed above the brood chamber of a hive where the bees store surplus honey for harvesting.",
    ),
    ("In the NATO phonetic alphabet, how is the word CAB spelled out?", "Charlie, Alpha, Bravo."),
    (
        "In typography, what is kerning?",
        "Kerning is adjusting the space between two specific letters, such as A and V, so the text looks evenly spaced.",
    ),
    (
        "In astronomy, what is a parsec?",
        "A parsec is the distance at which one astronomical unit subtends an angle of one arcsecond, about 3.26 light-years.",
    ),
    ("¿Cuántos días tiene una semana?", "Una semana tiene siete días."),
    (
        "In Git, what does 'git stash' do?",
        "It saves your uncommitted changes on a stack and restores a clean working tree; 'git stash pop' brings them back.",
    ),
    ("In pharmacology, what does 'b.i.d.' mean on a prescription?", "b.i.d. (bis in die) means twice a day."),
]

# For each isolated item, a new sample on the same topic, written for the gate benchmark: what a
# good extension of that sparse sample looks like (another task in the same rare domain, with a
# correct answer), keyed by the isolated item's prompt.
# The same task as each isolated item in other words, with its answer reworded: what an
# optimizer asked to extend a sparse sample writes when it only paraphrases it (a bad extension:
# it adds no new task). Written for the gate benchmark, reworded as a person would (synonyms,
# another order), not by a rule.
PARAPHRASES = {
    ISOLATED[0][0]: (
        "Gib diesen Satz in einfacher Sprache wieder: Die Bundesregierung hat beschlossen, den Ausbau der erneuerbaren Energien im kommenden Jahrzehnt deutlich zu beschleunigen.",
        "Die Regierung möchte in den kommenden zehn Jahren den Strom aus Wind, Sonne und anderen erneuerbaren Quellen viel schneller ausbauen.",
    ),
    ISOLATED[1][0]: (
        "What messenger RNA is transcribed from the DNA strand TACGGATTCAGCTTAAGC?",
        "Pairing A with U, T with A, C with G and G with C gives the mRNA AUGCCUAAGUCGAAUUCG.",
    ),
    ISOLATED[2][0]: (
        "Translate the following Morse code into text: .... . .-.. .-.. --- / .-- --- .-. .-.. -..",
        "It says HELLO WORLD.",
    ),
    ISOLATED[3][0]: (
        "Which opening arises after 1. e4 e5 2. Nf3 Nc6 3. Bb5 a6, and what is White's usual next move?",
        "That is the Morphy Defence of the Ruy Lopez. White normally plays 4. Ba4 to keep the pin idea, or exchanges on c6 with 4. Bxc6.",
    ),
    ISOLATED[4][0]: (
        "What does the LaTeX code \\int_0^{\\infty} e^{-x^2} \\, dx = \\frac{\\sqrt{\\pi}}{2} display?",
        "It displays the Gaussian integral: integrating e to the minus x squared from zero to infinity gives the square root of pi over two.",
    ),
    ISOLATED[5][0]: (
        "Explain when the cron schedule 15 3 * * 1-5 fires.",
        "Every weekday, Monday through Friday, at 03:15: minute 15, hour 3, any day of the month and any month.",
    ),
    ISOLATED[6][0]: (
        "What is the systematic IUPAC name for CC(=O)OC1=CC=CC=C1C(=O)O, written in SMILES?",
        "The molecule is aspirin, whose IUPAC name is 2-acetoxybenzoic acid, also written 2-(acetyloxy)benzoic acid.",
    ),
    ISOLATED[7][0]: (
        "What do k2tog, yo and ssk stand for in knitting instructions?",
        "k2tog means knit two together, a decrease leaning right; yo is a yarn over, an increase that leaves a small hole; ssk is slip, slip, knit, a decrease leaning left.",
    ),
    ISOLATED[8][0]: (
        "What does a 6/4 figure written below a bass note mean in figured bass?",
        "It marks a triad in second inversion: a sixth and a fourth above the bass, which puts the chord's fifth in the bass.",
    ),
    ISOLATED[9][0]: (
        "How does tacking differ from gybing when you sail a boat?",
        "Each moves the wind to the other side of the boat. In a tack the bow passes through the wind; in a gybe the stern does, and the boom swings across more violently.",
    ),
    ISOLATED[10][0]: (
        "Comment dit-on en anglais : « Le boulanger ouvre sa boutique à six heures du matin. » ?",
        "The baker opens his shop at 6 a.m.",
    ),
    ISOLATED[11][0]: (
        "Which strings does the regex ^[A-Z]{2}\\d{4}$ accept?",
        "Only strings made of two uppercase letters followed by four digits, for example AB1234.",
    ),
    ISOLATED[12][0]: (
        "Which sharps are in the E major key signature, and how many are there?",
        "There are four sharps in E major: F sharp, C sharp, G sharp and D sharp.",
    ),
    ISOLATED[13][0]: (
        "What are the red, green and blue values of the hex colour #FF8000?",
        "Red 255, green 128 and blue 0, which is a bright orange.",
    ),
    ISOLATED[14][0]: (
        "Using the Milton Work point count in bridge, what is an ace worth?",
        "Four high-card points; a king counts three, a queen two and a jack one.",
    ),
    ISOLATED[15][0]: (
        "Which Köppen code is used for hot desert climates?",
        "BWh: B means arid, W desert and h hot.",
    ),
    ISOLATED[16][0]: (
        "How do the WHERE and HAVING clauses differ in SQL?",
        "WHERE filters individual rows before they are grouped, while HAVING filters the groups after GROUP BY and can therefore use aggregates like COUNT(*).",
    ),
    ISOLATED[17][0]: (
        "Which three small bones are found in the middle ear?",
        "The hammer (malleus), the anvil (incus) and the stirrup (stapes).",
    ),
    ISOLATED[18][0]: (
        "What is the meaning of LBW in cricket?",
        "It means leg before wicket: a batter is given out when the ball hits their body first but would otherwise have hit the stumps.",
    ),
    ISOLATED[19][0]: (
        "Which number does the Roman numeral MCMXCIV stand for?",
        "It stands for 1994, since M is 1000, CM 900, XC 90 and IV 4.",
    ),
    ISOLATED[20][0]: (
        "Was für eine Farbe bekommt man, wenn man Gelb und Blau zusammenmischt?",
        "Aus Gelb und Blau gemischt entsteht Grün.",
    ),
    ISOLATED[21][0]: (
        "What does ${VAR:-default} evaluate to in bash?",
        "The value of VAR, or the word default if VAR is empty or not set.",
    ),
    ISOLATED[22][0]: (
        "Which colour does the heraldic tincture gules stand for?",
        "In heraldry, gules means red.",
    ),
    ISOLATED[23][0]: (
        "Explain the Unix permissions rwxr-x--- for the owner, the group and everyone else.",
        "The owner may read, write and execute, the group may read and execute, and others get no access at all.",
    ),
    ISOLATED[24][0]: (
        "What does a valley fold mean in origami?",
        "In a valley fold the paper is folded towards you, so the crease sinks like a valley; the mountain fold is its opposite.",
    ),
    ISOLATED[25][0]: ("What is the Latin plural of 'corpus'?", "Its plural is corpora."),
    ISOLATED[26][0]: (
        "What do beekeepers mean by a 'super'?",
        "A super is a box set on top of the hive's brood chamber, where the bees store the surplus honey that is harvested.",
    ),
    ISOLATED[27][0]: ("How do you spell CAB using the NATO phonetic alphabet?", "Charlie Alpha Bravo."),
    ISOLATED[28][0]: (
        "What does kerning mean in typography?",
        "Kerning is the adjustment of the spacing between particular pairs of letters, like A and V, so that the text looks evenly spaced.",
    ),
    ISOLATED[29][0]: (
        "How is a parsec defined in astronomy?",
        "It is the distance at which one astronomical unit subtends one arcsecond, roughly 3.26 light-years.",
    ),
    ISOLATED[30][0]: ("¿Cuántos días hay en una semana?", "Hay siete días en una semana."),
    ISOLATED[31][0]: (
        "What does the command 'git stash' do in Git?",
        "It puts your uncommitted changes on a stack and leaves a clean working tree; 'git stash pop' restores them.",
    ),
    ISOLATED[32][0]: (
        "On a prescription, what does the abbreviation 'b.i.d.' mean?",
        "It stands for bis in die: take it twice a day.",
    ),
}

EXTENSIONS = {
    ISOLATED[0][0]: (
        "Fasse den folgenden Satz in einfachen Worten zusammen: Die Stadt hat angekündigt, die Öffnungszeiten der öffentlichen Bibliotheken ab dem nächsten Monat zu verlängern.",
        "Die Bibliotheken der Stadt sind ab nächstem Monat länger geöffnet.",
    ),
    ISOLATED[1][0]: (
        "Transcribe this DNA template strand into messenger RNA: TTAGCCGATACG",
        "The mRNA is AAUCGGCUAUGC: each A becomes U, each T becomes A, each C becomes G and each G becomes C.",
    ),
    ISOLATED[2][0]: ("Decode this Morse code message: ... --- ...", "The message reads: SOS."),
    ISOLATED[3][0]: (
        "In chess, what is the name of the opening 1. d4 d5 2. c4?",
        "It is the Queen's Gambit: White offers the c-pawn to draw Black's d-pawn away from the centre.",
    ),
    ISOLATED[4][0]: (
        "Explain what this LaTeX renders to: \\sum_{n=1}^{\\infty} \\frac{1}{n^2} = \\frac{\\pi^2}{6}",
        "It renders the Basel problem: the sum of one over n squared, for n from one to infinity, equals pi squared divided by six.",
    ),
    ISOLATED[5][0]: (
        "What does this cron expression mean: 0 0 1 * *",
        "It runs at midnight (00:00) on the first day of every month.",
    ),
    ISOLATED[6][0]: (
        "Which common molecule has the SMILES string CCO?",
        "CCO is ethanol (ethyl alcohol): two carbons in a chain with a hydroxyl group on the second.",
    ),
    ISOLATED[7][0]: (
        "When knitting, how does a purl stitch differ from a knit stitch?",
        "A purl stitch is the reverse of a knit stitch: a knit stitch shows a V on the side facing you, a purl stitch a small horizontal bump. Knitting one row and purling the next gives stockinette.",
    ),
    ISOLATED[8][0]: (
        "In figured bass, what does the figure 6 under a bass note indicate?",
        "It indicates a first-inversion triad: the notes a sixth and a third above the bass, so the third of the chord is in the bass.",
    ),
    ISOLATED[9][0]: (
        "In sailing, what do port and starboard mean?",
        "Facing the bow, port is the left side of the boat and starboard is the right side.",
    ),
    ISOLATED[10][0]: (
        "Traduis en anglais : « Les enfants jouent dans le jardin après l'école. »",
        "The children play in the garden after school.",
    ),
    ISOLATED[11][0]: (
        "What does the regular expression ^\\d{3}-\\d{4}$ match?",
        "Strings of exactly three digits, a hyphen and exactly four digits, such as 555-1234, and nothing else.",
    ),
    ISOLATED[12][0]: (
        "In music theory, how many flats does the key of F major have and what are they?",
        "F major has one flat: B flat.",
    ),
    ISOLATED[13][0]: (
        "Convert the hexadecimal colour code #0000FF to its RGB components.",
        "#0000FF is red 0, green 0, blue 255: pure blue.",
    ),
    ISOLATED[14][0]: (
        "In bridge, how many cards is each of the four players dealt?",
        "Each player is dealt thirteen cards, the whole 52-card deck.",
    ),
    ISOLATED[15][0]: (
        "What is the Köppen climate classification code for a tropical rainforest climate?",
        "A tropical rainforest climate is Af: A for tropical, f for wet in every month.",
    ),
    ISOLATED[16][0]: (
        "In SQL, what is the difference between INNER JOIN and LEFT JOIN?",
        "INNER JOIN keeps only rows that match in both tables; LEFT JOIN keeps every row of the left table and fills the right side with NULL where nothing matches.",
    ),
    ISOLATED[17][0]: (
        "Which bone of the human body is the longest?",
        "The femur, the thigh bone, is the longest bone of the human body.",
    ),
    ISOLATED[18][0]: (
        "In cricket, how many balls are there in an over?",
        "An over has six legal deliveries, bowled by the same bowler.",
    ),
    ISOLATED[19][0]: ("Read this Roman numeral: MMXXIV", "MMXXIV is 2024: MM = 2000, XX = 20, IV = 4."),
    ISOLATED[20][0]: (
        "Welche Farbe entsteht, wenn man Rot und Gelb mischt?",
        "Wenn man Rot und Gelb mischt, entsteht Orange.",
    ),
    ISOLATED[21][0]: (
        "In a bash script, what does the expression $# hold?",
        "$# holds the number of positional arguments passed to the script or function.",
    ),
    ISOLATED[22][0]: (
        "In heraldry, what is the tincture called 'azure'?",
        "Azure is the heraldic name for the colour blue.",
    ),
    ISOLATED[23][0]: (
        "What does the Unix permission string rw-r--r-- mean for the owner, group and others?",
        "The owner can read and write; the group and others can only read.",
    ),
    ISOLATED[24][0]: (
        "In origami, what is a mountain fold?",
        "A mountain fold folds the paper away from you so that the crease rises like a ridge; its opposite is the valley fold.",
    ),
    ISOLATED[25][0]: ("What is the plural of the Latin word 'datum'?", "The plural of datum is data."),
    ISOLATED[26][0]: (
        "In beekeeping, what is a 'brood box'?",
        "The brood box is the lowest box of the hive, where the queen lays eggs and the young bees are raised.",
    ),
    ISOLATED[27][0]: (
        "In the NATO phonetic alphabet, how is the word DOG spelled out?",
        "Delta, Oscar, Golf.",
    ),
    ISOLATED[28][0]: (
        "In typography, what is leading?",
        "Leading is the vertical space between lines of text, measured from one baseline to the next.",
    ),
    ISOLATED[29][0]: (
        "In astronomy, what is an astronomical unit?",
        "An astronomical unit is the mean distance from the Earth to the Sun, about 150 million kilometres.",
    ),
    ISOLATED[30][0]: ("¿Cuántos meses tiene un año?", "Un año tiene doce meses."),
    ISOLATED[31][0]: (
        "In Git, what does 'git rebase' do?",
        "It moves or replays your commits on top of another base commit, rewriting them so the history reads as a straight line.",
    ),
    ISOLATED[32][0]: (
        "In pharmacology, what does 'q.d.' mean on a prescription?",
        "q.d. (quaque die) means once a day.",
    ),
}

_DUP_EDITS = [
    lambda s: "Please " + s[0].lower() + s[1:],
    lambda s: s.rstrip(".?!") + ", please.",
    lambda s: s + " Keep it brief.",
    lambda s: "Could you " + s[0].lower() + s[1:].rstrip(".?!") + "?",
    lambda s: s.replace(" the ", " this ", 1) if " the " in s else s + " Thanks.",
    lambda s: "Task: " + s,
]


# ----------------------------------------------------------------------------------------------
# transformations


def _words(text: str) -> list[str]:
    return text.split()


def garble(text: str, rng: random.Random) -> str:
    words = _words(text)
    rng.shuffle(words)
    out = []
    for w in words:
        letters = list(w)
        if len(letters) > 3:
            mid = letters[1:-1]
            rng.shuffle(mid)
            letters = [letters[0], *mid, letters[-1]]
        if rng.random() < 0.3 and len(letters) > 2:
            del letters[rng.randrange(len(letters))]
        out.append("".join(letters))
    return " ".join(out)


def truncate(text: str, rng: random.Random) -> str:
    words = _words(text)
    keep = max(2, min(4, len(words) // 4))
    return " ".join(words[:keep])


def _first_sentence(text: str, max_words: int = 14) -> str:
    """The first sentence or line with at least four words (material for the hard tasks)."""
    for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()):
        words = [w for w in _words(s) if any(c.isalpha() for c in w)]
        if len(words) >= 4:
            return " ".join(words[:max_words]).strip(" ,;:")
    return "The quick brown fox jumps over the lazy dog"


def caesar(text: str, shift: int) -> str:
    def rot(c: str) -> str:
        if "a" <= c <= "z":
            return chr((ord(c) - 97 + shift) % 26 + 97)
        if "A" <= c <= "Z":
            return chr((ord(c) - 65 + shift) % 26 + 65)
        return c

    return "".join(rot(c) for c in text)


def make_hard(row: dict, kind: str, rng: random.Random) -> tuple[str, str]:
    material = _first_sentence(row["output"])
    if kind == "arithmetic":
        a, b, c = rng.randrange(10_000, 99_999), rng.randrange(1_000, 9_999), rng.randrange(100_000, 999_999)
        d = rng.randrange(11, 97)
        p = a * b
        q = p - c
        r = q * d
        prompt = (
            f"Multiply {a} by {b}, subtract {c} from the product, then multiply the difference by {d}. "
            f"Give the intermediate results and the exact final result."
        )
        response = f"The product is {p}. Subtracting gives {q}. The final result is {r}."
        return prompt, response
    if kind == "caesar":
        shift = rng.randrange(3, 23)
        return (
            f"Encrypt the following sentence with a Caesar cipher that shifts every letter forward by {shift} "
            f'positions: "{material}"'
        ), caesar(material, shift)
    if kind == "reverse_words":
        return (
            f"Write every word of the following sentence with its letters in reverse order, keeping the word "
            f'order: "{material}"'
        ), " ".join(w[::-1] for w in _words(material))
    if kind == "reverse_chars":
        return (f'Write the following sentence backwards, character by character: "{material}"'), material[::-1]
    raise ValueError(kind)


QUALITY_KINDS = ("unrelated_response", "wrong_answer", "garbled_prompt", "truncated_prompt")
HARD_KINDS = ("caesar", "reverse_words", "arithmetic", "reverse_chars")


def _row(
    instruction: str, input_: str, output: str, defect: str, kind: str, source: int | None, category: str = ""
) -> dict:
    return {
        "instruction": instruction,
        "input": input_,
        "output": output,
        "defect": defect,
        "kind": kind,
        "source_index": -1 if source is None else source,
        "category": category,
    }


def build(
    seed_rows: list[dict],
    *,
    n_clean: int,
    n_quality: int,
    n_hard: int,
    n_dup_clusters: int,
    dup_size: int,
    n_isolated: int,
    seed: int = 0,
    clean_siblings: int = 0,
) -> list[dict]:
    """The labelled controlled dataset (rows shuffled deterministically).

    ``n_quality`` defective rows, the four kinds in turn (so ``4 * m`` gives m of each);
    ``clean_siblings > 0``: every clean seed sample comes with that many light paraphrases of
    its prompt (same answer, ``kind = "clean"``), so a clean topic has neighbours and
    "isolated" means having none."""
    rng = random.Random(seed)
    order = list(range(len(seed_rows)))
    rng.shuffle(order)
    n_material = sum(1 for j in range(n_quality) if QUALITY_KINDS[j % len(QUALITY_KINDS)] != "wrong_answer")
    need = n_clean + n_material + n_hard + n_dup_clusters
    if len(order) < need:
        raise ValueError(f"the seed has {len(order)} rows; the controlled set needs {need} distinct ones")
    if n_isolated > len(ISOLATED):
        raise ValueError(f"only {len(ISOLATED)} isolated items are written; {n_isolated} asked")
    take = iter(order)
    rows: list[dict] = []

    for _ in range(n_clean):
        i = next(take)
        r = seed_rows[i]
        rows.append(_row(r["instruction"], r.get("input", ""), r["output"], "none", "clean", i, r.get("category", "")))
        edits = list(_DUP_EDITS)
        rng.shuffle(edits)
        seen = {r["instruction"].strip()}
        for e in edits:
            if len(seen) > clean_siblings:
                break
            text = e(r["instruction"].strip())
            if text not in seen:
                seen.add(text)
                rows.append(_row(text, r.get("input", ""), r["output"], "none", "clean", i, r.get("category", "")))

    wrong = list(WRONG_ANSWERS)
    rng.shuffle(wrong)
    n_wrong = 0
    for j in range(n_quality):
        kind = QUALITY_KINDS[j % len(QUALITY_KINDS)]
        if kind == "wrong_answer":
            q, a = wrong[n_wrong % len(wrong)]
            n_wrong += 1
            rows.append(_row(q, "", a, "quality", kind, None, "wrong_fact"))
            continue
        i = next(take)
        r = seed_rows[i]
        if kind == "unrelated_response":
            cat = r.get("category", "")
            others = [k for k in order if seed_rows[k].get("category", "") != cat and k != i] or [
                k for k in order if k != i
            ]
            donor = seed_rows[rng.choice(others)]
            rows.append(
                _row(r["instruction"], r.get("input", ""), donor["output"], "quality", kind, i, r.get("category", ""))
            )
        elif kind == "garbled_prompt":
            rows.append(
                _row(
                    garble(r["instruction"], rng),
                    garble(r.get("input", ""), rng) if r.get("input") else "",
                    r["output"],
                    "quality",
                    kind,
                    i,
                    r.get("category", ""),
                )
            )
        else:
            rows.append(
                _row(truncate(r["instruction"], rng), "", r["output"], "quality", kind, i, r.get("category", ""))
            )

    for j in range(n_hard):
        kind = HARD_KINDS[j % len(HARD_KINDS)]
        i = next(take)
        prompt, response = make_hard(seed_rows[i], kind, rng)
        rows.append(_row(prompt, "", response, "hard", kind, i, seed_rows[i].get("category", "")))

    for c in range(n_dup_clusters):
        i = next(take)
        r = seed_rows[i]
        rows.append(
            _row(
                r["instruction"], r.get("input", ""), r["output"], "duplicate", f"cluster_{c}", i, r.get("category", "")
            )
        )
        edits = list(_DUP_EDITS)
        rng.shuffle(edits)
        for e in edits[: dup_size - 1]:
            rows.append(
                _row(
                    e(r["instruction"].strip()),
                    r.get("input", ""),
                    r["output"],
                    "duplicate",
                    f"cluster_{c}",
                    i,
                    r.get("category", ""),
                )
            )

    iso = list(ISOLATED)
    rng.shuffle(iso)
    for q, a in iso[:n_isolated]:
        rows.append(_row(q, "", a, "isolated", "isolated_topic", None, "isolated"))

    rng.shuffle(rows)
    for k, r in enumerate(rows):
        r["row"] = k
    return rows
