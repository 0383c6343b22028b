#!/usr/bin/env python3
"""Regenerate the embedded datasets under data/ (seed SFT set and held-out eval sets).

    python3 scripts/make_data.py            # write data/seed_alpaca.json, eval_heldout.jsonl, eval_large.jsonl
    python3 scripts/make_data.py --check    # also run every code answer and validate the three files

Everything here was written for middo-pipeline (Apache-2.0, like the rest of the project).
The math word problems marked "generated" come from fixed templates and a fixed random seed,
so the output is byte-for-byte reproducible. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sqlite3
import subprocess
import tempfile
from collections import Counter
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
CATEGORIES = ("reasoning", "writing", "coding", "math", "facts", "extraction")

# --------------------------------------------------------------------------------------------
# Seed samples: (category, instruction, input, output)
# --------------------------------------------------------------------------------------------

REASONING = [
    (
        "If all roses are flowers and some flowers fade quickly, can we conclude that some roses fade quickly?",
        "",
        "No. The flowers that fade quickly might not include any roses, so the conclusion does not follow from the premises.",
    ),
    (
        "Tom is taller than Ana, and Ana is taller than Raj. Who is the shortest of the three?",
        "",
        "Raj is the shortest. Tom is taller than Ana and Ana is taller than Raj, so Raj is below both of them.",
    ),
    (
        "A notebook and a pen cost $1.20 together. The notebook costs $1.00 more than the pen. How much does the pen cost?",
        "",
        "The pen costs $0.10. If the pen costs x, the notebook costs x + 1.00, so 2x + 1.00 = 1.20 and x = 0.10.",
    ),
    (
        "What number comes next in the sequence 2, 6, 12, 20, 30?",
        "",
        "42. The gaps grow by 2 each time (4, 6, 8, 10), so the next gap is 12 and 30 + 12 = 42.",
    ),
    (
        "If today is Wednesday, what day of the week will it be 10 days from now?",
        "",
        "Saturday. Ten days is one full week plus 3 days, and 3 days after Wednesday is Saturday.",
    ),
    (
        "A shelter has 15 cats. All but 6 of them are adopted. How many cats are still at the shelter?",
        "",
        '6 cats. "All but 6" means every cat except 6 was adopted, so 6 remain.',
    ),
    (
        'Is the statement "every square is a rectangle" true? Explain briefly.',
        "",
        "Yes. A rectangle is any four-sided shape with four right angles. A square has four right angles, so it is a rectangle whose sides also happen to be equal.",
    ),
    (
        'Three boxes are labeled "apples", "oranges" and "mixed", and every label is wrong. You may take one fruit from one box. Which box should you choose?',
        "",
        'Take a fruit from the box labeled "mixed". Because its label is wrong, it holds only one kind of fruit, and the fruit you draw tells you which. The other two labels can then be worked out, since each of them is also wrong.',
    ),
    (
        "A clock shows exactly 3:00. What is the angle between the hour hand and the minute hand?",
        "",
        "90 degrees. The minute hand points at 12 and the hour hand at 3, which is a quarter of the full 360-degree circle.",
    ),
    (
        "Four printers print four posters in four minutes. How long do eight printers need to print eight posters?",
        "",
        "Four minutes. Each printer makes one poster in four minutes, so eight printers working at once make eight posters in the same time.",
    ),
    (
        "Which is heavier: a kilogram of feathers or a kilogram of iron?",
        "",
        "Neither. Both weigh exactly one kilogram; the iron is just much more compact.",
    ),
    (
        "All of Sam's pets are dogs. Sam has a pet named Rex. What kind of animal is Rex?",
        "",
        "Rex is a dog, because every pet Sam owns is a dog.",
    ),
    (
        'Find the flaw in this argument: "Ice cream sales and drownings rise at the same time, so ice cream causes drowning."',
        "",
        "It confuses correlation with causation. A third factor, hot weather, makes people both buy more ice cream and swim more, which explains why the two rise together.",
    ),
    (
        "Five runners finish a race. Omar finishes first and Nia finishes last. Kim finishes after Max but before Lou. In what position does Kim finish?",
        "",
        "Kim finishes third. Omar is first and Nia fifth, so Max, Kim and Lou take places 2 to 4 in that order.",
    ),
    (
        "No reptiles have fur, and all snakes are reptiles. Do any snakes have fur?",
        "",
        "No. Every snake is a reptile, and no reptile has fur, so no snake has fur.",
    ),
    (
        "Complete the analogy: hand is to glove as foot is to what?",
        "",
        "Sock. A glove is worn over a hand, and a sock is worn over a foot.",
    ),
    (
        "Which number does not belong in the list 3, 5, 7, 9, 11, and why?",
        "",
        "9 does not belong. It is the only number in the list that is not prime, since 9 = 3 x 3.",
    ),
    (
        "You have a 3-litre jug, a 5-litre jug and a tap. How can you measure exactly 4 litres?",
        "",
        "Fill the 5-litre jug and pour it into the 3-litre jug, leaving 2 litres. Empty the 3-litre jug and pour the 2 litres into it. Fill the 5-litre jug again and top up the 3-litre jug, which takes 1 litre. Exactly 4 litres remain in the 5-litre jug.",
    ),
    (
        "Anna was born in 1990, and her brother Ben is 7 years younger. In what year was Ben born?",
        "",
        "Ben was born in 1997, since being 7 years younger means being born 7 years later: 1990 + 7 = 1997.",
    ),
    (
        "A train leaves at 9:45 and the trip takes 2 hours and 30 minutes. What time does it arrive?",
        "",
        "It arrives at 12:15. Two hours after 9:45 is 11:45, and 30 more minutes makes 12:15.",
    ),
    (
        "Some teachers are musicians, and all musicians practice every day. Must some teachers practice every day?",
        "",
        "Yes. The teachers who are musicians practice every day, because all musicians do.",
    ),
    (
        "Pick the odd one out: apple, banana, carrot, grape.",
        "",
        "Carrot. It is a vegetable, while apple, banana and grape are all fruits.",
    ),
    (
        "A room has four corners, and a cat sits in each corner. Each cat sees three other cats. How many cats are in the room?",
        "",
        "Four cats. One cat sits in each corner, and each of them sees the other three.",
    ),
    (
        "If the day after tomorrow is Sunday, what day was yesterday?",
        "",
        "Thursday. If the day after tomorrow is Sunday, today is Friday, so yesterday was Thursday.",
    ),
    (
        "Order these numbers from smallest to largest: 0.5, 1/3, 0.45, 2/5.",
        "",
        "1/3, 2/5, 0.45, 0.5. As decimals they are about 0.333, 0.4, 0.45 and 0.5.",
    ),
    (
        'A shop offers "buy two, get one free" on items costing $6 each. How much do you pay for six items?',
        "",
        "$24. Six items form two groups of three, and in each group you pay for two, so you pay for 4 items: 4 x $6 = $24.",
    ),
    (
        "Whenever it rains, the street gets wet. The street is wet now. Did it necessarily rain?",
        "",
        "No. Rain is one way the street gets wet, but a sprinkler or a street cleaner could also have wet it. Reasoning backwards like this is called affirming the consequent.",
    ),
    (
        "What letter comes next: A, C, F, J, O?",
        "",
        "U. The steps between letters grow by one each time (2, 3, 4, 5), so the next step is 6, and six letters after O is U.",
    ),
    (
        "Sara's car is red, blue or green. She truthfully says it is neither red nor blue. What color is her car?",
        "",
        "Green, because it is the only option left once red and blue are ruled out.",
    ),
    (
        "Which is longer: 100 minutes or 1.5 hours?",
        "",
        "100 minutes is longer. 1.5 hours equals 90 minutes, which is 10 minutes shorter.",
    ),
]

WRITING = [
    (
        "Write a haiku about a rainy morning.",
        "",
        "Gray clouds drift slowly\nraindrops tap the window glass\ncoffee steams nearby",
    ),
    (
        "Write a one-sentence thank-you note to a neighbor who watered your plants while you were away.",
        "",
        "Thank you so much for watering my plants while I was away; they look happier than ever, and I really appreciate your help.",
    ),
    (
        "Suggest three names for a small bakery that specializes in sourdough bread.",
        "",
        "1. Rise & Crust\n2. The Wild Yeast\n3. Slow Dough Bakery",
    ),
    (
        "Rewrite this sentence in a more formal tone.",
        "Hey, can you send me that report real quick?",
        "Could you please send me the report at your earliest convenience?",
    ),
    (
        "Write a short product description for a reusable steel water bottle.",
        "",
        "Stay refreshed all day with our stainless steel bottle. Its double walls keep drinks cold for hours, the leak-proof lid fits any bag, and it replaces hundreds of plastic bottles each year.",
    ),
    (
        "Write an opening line for a mystery story set in a lighthouse.",
        "",
        "The lighthouse keeper had not missed a night in thirty years, so when the lamp stayed dark on Tuesday, the whole village knew something was wrong.",
    ),
    (
        "Compose a short, polite email declining a meeting invitation.",
        "",
        "Hi Jordan,\n\nThank you for the invitation to Thursday's planning meeting. Unfortunately, I have a prior commitment at that time and won't be able to attend. Could you share the notes afterwards? I'm happy to send my input by email beforehand.\n\nBest regards,\nSam",
    ),
    (
        "Give a one-line piece of encouragement for someone starting to learn a new language.",
        "",
        "Every word you learn today is one more door you can open tomorrow, so keep going.",
    ),
    (
        "Turn this shopping list into a friendly request to a family member.",
        "milk, eggs, bread, apples",
        "Could you pick up some milk, eggs, bread, and apples on your way home? Thanks!",
    ),
    (
        "Write a limerick about a cat who loves cardboard boxes.",
        "",
        "There once was a cat named Lou,\nWho found every box that was new.\nShe'd squeeze herself in\nWith a satisfied grin,\nAnd nap there the whole evening through.",
    ),
    (
        "Correct the grammar in this sentence.",
        "Me and him goes to the park every weekends.",
        "He and I go to the park every weekend.",
    ),
    ("Write a catchy tagline for a bicycle repair shop.", "", "We fix it fast, so you can ride on."),
    (
        "Describe autumn in exactly three sentences.",
        "",
        "The air turns crisp and smells faintly of wood smoke. Trees trade their green for red, orange and gold. Leaves drift down and crunch softly under every step.",
    ),
    (
        "Write a short text message apologizing to a friend for arriving late to dinner.",
        "",
        "So sorry for showing up late tonight! I should have left earlier. Next dinner is on me.",
    ),
    (
        "Paraphrase the following sentence.",
        "The committee postponed the decision until more data was available.",
        "The committee delayed its decision until it could gather more data.",
    ),
    (
        "Write a four-line poem about the ocean with an AABB rhyme scheme.",
        "",
        "The waves roll in with steady grace,\nThey leave their foam in every place.\nThe gulls cry out above the sand,\nWhere sea and sky meet near the land.",
    ),
    (
        "Write a short birthday message for a coworker.",
        "",
        "Happy birthday! Thanks for making the office a brighter place. I hope your day is full of good food, laughter and a well-earned break.",
    ),
    (
        "Suggest a catchy title for a blog post about saving money on groceries.",
        "",
        "Fill Your Cart, Not Your Receipt: 10 Simple Ways to Save on Groceries",
    ),
    (
        "Write a brief out-of-office auto-reply for a one-week vacation.",
        "",
        "Thank you for your email. I am out of the office until Monday, June 10, with limited access to email. For urgent matters, please contact Priya at priya@example.com. I will reply when I return.",
    ),
    (
        "Make this sentence more concise.",
        "Due to the fact that it was raining, we made the decision to stay inside.",
        "Because it was raining, we decided to stay inside.",
    ),
    (
        "Write a two-sentence horror story.",
        "",
        "Every night I count the steps from my bed to the bedroom door, and there are always twelve. Tonight, with the lights off, I counted thirteen.",
    ),
    (
        "Describe the smell of fresh bread to someone who has never smelled it.",
        "",
        "It is warm and comforting, a little sweet and a little nutty, like toasted grain mixed with a hint of caramel. It fills a room quickly and makes almost everyone hungry.",
    ),
    (
        "Write a short welcome message for new members of a hiking club.",
        "",
        "Welcome to the trail! We're thrilled to have you with us. Check the calendar for upcoming hikes, bring water and good shoes, and don't be shy about asking questions. See you outdoors!",
    ),
    (
        "Convert this passive sentence to the active voice.",
        "The cake was eaten by the children.",
        "The children ate the cake.",
    ),
    (
        "Write a short review of a fictional cafe called The Blue Kettle.",
        "",
        "The Blue Kettle is a cozy little spot with mismatched chairs and a window full of plants. The chai is spiced just right, and the lemon scones are worth the trip alone. Service is slow at lunchtime, but the relaxed mood makes up for it. Four stars.",
    ),
    (
        "Suggest a polite way to ask a roommate to keep the kitchen clean.",
        "",
        '"Hey, could we try to wash our dishes and wipe the counters the same day we cook? It would make the kitchen much nicer for both of us. Let me know if you\'d like to set up a schedule."',
    ),
    (
        "Write a one-paragraph bio for a freelance photographer named Dana Cruz.",
        "",
        "Dana Cruz is a freelance photographer who captures weddings, portraits and city life with a warm, natural style. With more than eight years behind the lens, Dana loves finding quiet, honest moments in busy places. When not shooting, Dana teaches beginner photography workshops and explores new neighborhoods on foot.",
    ),
    (
        'Write a short riddle whose answer is "a shadow".',
        "",
        "I follow you all day but vanish at night. I copy every move you make, yet I never make a sound. What am I? (A shadow.)",
    ),
    (
        "Give three tips for writing clear emails.",
        "",
        "1. Put the main point or request in the first two sentences.\n2. Use a specific subject line.\n3. Keep paragraphs short and end with a clear next step.",
    ),
    (
        "Write a two-line slogan encouraging people to recycle.",
        "",
        "Sort it, rinse it, toss it right,\nand give old things a second life.",
    ),
]

CODING = [
    (
        "Write a Python function that reverses a string.",
        "",
        "```python\ndef reverse_string(s):\n    return s[::-1]\n```",
        "assert reverse_string('abc') == 'cba'\nassert reverse_string('') == ''",
    ),
    (
        "Write a Python function that checks whether a number is prime.",
        "",
        "```python\ndef is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n            return False\n        i += 1\n    return True\n```",
        "assert [k for k in range(20) if is_prime(k)] == [2, 3, 5, 7, 11, 13, 17, 19]",
    ),
    (
        "Write a Python function that computes the factorial of n with a loop.",
        "",
        "```python\ndef factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n```",
        "assert factorial(0) == 1 and factorial(5) == 120",
    ),
    (
        "How do you read a text file line by line in Python?",
        "",
        'Open it with a `with` block and loop over the file object:\n\n```python\nwith open("notes.txt", encoding="utf-8") as f:\n    for line in f:\n        print(line.rstrip())\n```',
        "@file notes.txt",
    ),
    (
        "Write a Python function that counts the vowels in a string.",
        "",
        '```python\ndef count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in "aeiou")\n```',
        "assert count_vowels('Hello World') == 3",
    ),
    (
        "Write a list comprehension that gives the squares of the numbers 1 through 10.",
        "",
        "```python\nsquares = [n * n for n in range(1, 11)]\n```",
        "assert squares == [1, 4, 9, 16, 25, 36, 49, 64, 81, 100]",
    ),
    (
        "Write a Python function that returns the largest number in a non-empty list without using max().",
        "",
        "```python\ndef largest(nums):\n    best = nums[0]\n    for n in nums[1:]:\n        if n > best:\n            best = n\n    return best\n```",
        "assert largest([3, -1, 9, 4]) == 9 and largest([-5]) == -5",
    ),
    (
        "What does this Python code print?",
        "x = [1, 2, 3]\ny = x\ny.append(4)\nprint(x)",
        "It prints [1, 2, 3, 4]. The names x and y refer to the same list, so appending through y also changes x.",
        None,
    ),
    (
        "Fix the bug in this function.",
        "def average(nums):\n    return sum(nums) / len(num)",
        "The function uses the undefined name `num`. It should be `nums`:\n\n```python\ndef average(nums):\n    return sum(nums) / len(nums)\n```",
        "assert average([2, 4, 6]) == 4",
    ),
    (
        "Write a Python function that checks whether a string is a palindrome, ignoring case.",
        "",
        "```python\ndef is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]\n```",
        "assert is_palindrome('Racecar') and not is_palindrome('hello')",
    ),
    (
        "Write a Python function that merges two dictionaries, letting values from the second win on conflicts.",
        "",
        "```python\ndef merge(a, b):\n    return {**a, **b}\n```",
        "assert merge({'x': 1, 'y': 2}, {'y': 3}) == {'x': 1, 'y': 3}",
    ),
    (
        "Write FizzBuzz in Python for the numbers 1 to 15.",
        "",
        '```python\nfor i in range(1, 16):\n    if i % 15 == 0:\n        print("FizzBuzz")\n    elif i % 3 == 0:\n        print("Fizz")\n    elif i % 5 == 0:\n        print("Buzz")\n    else:\n        print(i)\n```',
        "@stdout 1\n2\nFizz\n4\nBuzz\nFizz\n7\n8\nFizz\nBuzz\n11\nFizz\n13\n14\nFizzBuzz\n",
    ),
    (
        "Write a SQL query that selects every row from a table named users where age is greater than 30.",
        "",
        "```sql\nSELECT * FROM users WHERE age > 30;\n```",
        "@sql",
    ),
    (
        "Explain what a Python dictionary is in one or two sentences.",
        "",
        'A dictionary is a built-in collection that maps keys to values, like {"name": "Ada", "age": 36}. Keys must be hashable and unique, and looking up a value by its key is fast.',
        None,
    ),
    (
        "Write a Python function that removes duplicates from a list while keeping the original order.",
        "",
        "```python\ndef dedupe(items):\n    seen = set()\n    result = []\n    for item in items:\n        if item not in seen:\n            seen.add(item)\n            result.append(item)\n    return result\n```",
        "assert dedupe([3, 1, 3, 2, 1]) == [3, 1, 2]",
    ),
    (
        "Write a Python function that returns the nth Fibonacci number, where fib(0) = 0 and fib(1) = 1.",
        "",
        "```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```",
        "assert [fib(k) for k in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]",
    ),
    (
        "How do you get the number of items in a Python list?",
        "",
        "Use the built-in len() function, for example `len([4, 5, 6])` returns 3.",
        None,
    ),
    (
        "Write a Python function that converts a temperature from Celsius to Fahrenheit.",
        "",
        "```python\ndef c_to_f(celsius):\n    return celsius * 9 / 5 + 32\n```",
        "assert c_to_f(100) == 212 and c_to_f(0) == 32",
    ),
    (
        "Write a Python function that counts how often each word appears in a sentence.",
        "",
        "```python\nfrom collections import Counter\n\ndef word_counts(sentence):\n    return Counter(sentence.lower().split())\n```",
        "assert word_counts('the cat and the hat')['the'] == 2",
    ),
    (
        "What is the output of print(7 // 2, 7 % 2) in Python?",
        "",
        "It prints `3 1`. The // operator gives the floor of the division (3) and % gives the remainder (1).",
        "@stdout_expr print(7 // 2, 7 % 2)|3 1\n",
    ),
    (
        "Write a Python function that flattens a list of lists by one level.",
        "",
        "```python\ndef flatten(nested):\n    return [item for sub in nested for item in sub]\n```",
        "assert flatten([[1, 2], [3], []]) == [1, 2, 3]",
    ),
    (
        "Write a shell command that counts the lines in a file named log.txt.",
        "",
        "```bash\nwc -l < log.txt\n```",
        "@bash",
    ),
    (
        "Write a Python function that checks whether two strings are anagrams of each other.",
        "",
        "```python\ndef are_anagrams(a, b):\n    return sorted(a.lower()) == sorted(b.lower())\n```",
        "assert are_anagrams('Listen', 'Silent') and not are_anagrams('cat', 'car')",
    ),
    (
        "What is the difference between a list and a tuple in Python?",
        "",
        "A list is mutable: you can add, remove or change items after creating it. A tuple is immutable: once created, it cannot be changed. Lists use square brackets [1, 2] and tuples use parentheses (1, 2).",
        None,
    ),
    (
        "Write a Python function that adds up the digits of a non-negative integer.",
        "",
        "```python\ndef digit_sum(n):\n    total = 0\n    while n > 0:\n        total += n % 10\n        n //= 10\n    return total\n```",
        "assert digit_sum(4096) == 19 and digit_sum(0) == 0",
    ),
    (
        "Write a Python function that finds the greatest common divisor of two positive integers with Euclid's algorithm.",
        "",
        "```python\ndef gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n```",
        "assert gcd(48, 18) == 6 and gcd(7, 5) == 1",
    ),
    (
        "Write a small Python class for a counter with increment and reset methods.",
        "",
        "```python\nclass Counter:\n    def __init__(self):\n        self.value = 0\n\n    def increment(self):\n        self.value += 1\n\n    def reset(self):\n        self.value = 0\n```",
        "c = Counter(); c.increment(); c.increment()\nassert c.value == 2\nc.reset()\nassert c.value == 0",
    ),
    (
        "Write a JavaScript function that returns the sum of an array of numbers.",
        "",
        "```javascript\nfunction sum(numbers) {\n  return numbers.reduce((total, n) => total + n, 0);\n}\n```",
        "@js console.assert(sum([1, 2, 3]) === 6 && sum([]) === 0); if (sum([1, 2, 3]) !== 6) process.exit(1);",
    ),
    (
        "Write a Python function that returns True if a given year is a leap year.",
        "",
        "```python\ndef is_leap(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n```",
        "assert is_leap(2024) and is_leap(2000) and not is_leap(1900) and not is_leap(2023)",
    ),
    (
        'How do you sort a list of dictionaries by their "age" key in Python?',
        "",
        'Pass a key function to sorted():\n\n```python\npeople = [{"name": "Ana", "age": 31}, {"name": "Bo", "age": 25}]\nby_age = sorted(people, key=lambda p: p["age"])\n```',
        "assert [p['name'] for p in by_age] == ['Bo', 'Ana']",
    ),
    (
        "Write a binary search function in Python that returns the index of a target in a sorted list, or -1 if it is missing.",
        "",
        "```python\ndef binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n        if items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1\n```",
        "assert binary_search([1, 3, 5, 7, 9], 7) == 3 and binary_search([1, 3, 5], 4) == -1 and binary_search([], 1) == -1",
    ),
]

MATH_HAND = [
    ("What is 15% of 80?", "", "12. Fifteen percent is 0.15, and 0.15 x 80 = 12."),
    ("Solve for x: 3x + 7 = 22.", "", "x = 5. Subtract 7 from both sides to get 3x = 15, then divide by 3."),
    (
        "What is the area of a circle with radius 3? Give the answer in terms of pi.",
        "",
        "The area is 9π. The formula is πr², and 3² = 9.",
    ),
    ("Simplify the fraction 18/24.", "", "3/4. Both 18 and 24 are divisible by 6, so 18/24 = 3/4."),
    (
        "What is the sum of the interior angles of a hexagon?",
        "",
        "720 degrees. For a polygon with n sides the sum is (n - 2) x 180, and (6 - 2) x 180 = 720.",
    ),
    (
        "Write 0.375 as a fraction in lowest terms.",
        "",
        "3/8. 0.375 = 375/1000, and dividing top and bottom by 125 gives 3/8.",
    ),
    (
        "What is the least common multiple of 4 and 6?",
        "",
        "12. The multiples of 4 are 4, 8, 12, ... and of 6 are 6, 12, ...; the first one they share is 12.",
    ),
    (
        "A rectangle has a perimeter of 30 cm and a width of 5 cm. What is its length?",
        "",
        "10 cm. The perimeter is 2 x (length + width), so length + 5 = 15 and the length is 10 cm.",
    ),
    (
        "What is 2 raised to the power of 10?",
        "",
        "1024. Doubling 1 ten times gives 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024.",
    ),
    ("Find the median of 7, 2, 9, 4, 5.", "", "5. Sorted, the numbers are 2, 4, 5, 7, 9, and the middle value is 5."),
    (
        "A right triangle has legs of length 6 and 8. How long is the hypotenuse?",
        "",
        "10. By the Pythagorean theorem, 6² + 8² = 36 + 64 = 100, and the square root of 100 is 10.",
    ),
    (
        "If you flip a fair coin twice, what is the probability of getting two heads?",
        "",
        "1/4. Each flip is heads with probability 1/2, and the flips are independent, so 1/2 x 1/2 = 1/4.",
    ),
    (
        "Expand (x + 3)(x - 2).",
        "",
        "x² + x - 6. Multiplying out gives x² - 2x + 3x - 6, which simplifies to x² + x - 6.",
    ),
]

NAMES = [
    "Maya",
    "Leo",
    "Priya",
    "Daniel",
    "Sofia",
    "Kenji",
    "Amara",
    "Lucas",
    "Elena",
    "Omar",
    "Hana",
    "Tariq",
    "Grace",
    "Mateo",
    "Ines",
    "Felix",
    "Zara",
    "Noah",
    "Aisha",
    "Ruben",
]


def money(x: Fraction | float | int) -> str:
    return f"${float(x):.2f}"


def generated_math(seed: int = 2025) -> list[tuple[str, str, str]]:
    """Word problems from fixed templates; every answer is computed, with a one-line working."""
    rng = random.Random(seed)
    names = NAMES[:]
    rng.shuffle(names)
    name_iter = iter(names * 2)
    out: list[tuple[str, str, str]] = []

    def pairs(*pools):
        """Two different parameter combinations, so the two problems of a template differ."""
        combos = [()]
        for pool in pools:
            combos = [c + (v,) for c in combos for v in pool]
        first = rng.choice(combos)
        second = rng.choice([c for c in combos if all(a != b for a, b in zip(c, first))])
        return [first, second]

    for j, (n, cents) in enumerate(pairs([2, 3, 4, 5], [125, 150, 275, 325, 350])):  # change from a purchase
        who = next(name_iter)
        price = Fraction(cents, 100)
        cost = n * price
        change = 20 - cost
        q = (
            f"{who} buys {n} notebooks that cost {money(price)} each and pays with a $20 bill. How much change does {who} get back?",
            f"Notebooks are {money(price)} each at the school shop. If {who} hands over $20 for {n} of them, what change should come back?",
        )[j]
        out.append(
            (
                q,
                "",
                f"{money(change)}. The notebooks cost {n} x {money(price)} = {money(cost)}, and $20.00 - {money(cost)} = {money(change)}.",
            )
        )
    for j, (v, t) in enumerate(pairs([12, 15, 18, 24], [2, 3, 4])):  # distance = speed x time
        who = next(name_iter)
        q = (
            f"{who} cycles at a steady {v} km/h for {t} hours. How far does {who} ride?",
            f"How many kilometres does {who} cover by cycling for {t} hours without stopping at {v} km/h?",
        )[j]
        out.append((q, "", f"{v * t} km. Distance is speed times time: {v} x {t} = {v * t} km."))
    for item, (total, k) in zip(("stickers", "marbles"), pairs(range(23, 60), range(3, 8))):  # remainder
        while total % k == 0:
            total += 1
        q, r = divmod(total, k)
        prompt = {
            "stickers": f"{total} stickers are shared equally among {k} children. How many does each child get, and how many are left over?",
            "marbles": f"A teacher splits a jar of {total} marbles evenly between {k} children. How many marbles does each child receive, and how many remain in the jar?",
        }[item]
        out.append(
            (
                prompt,
                "",
                f"Each child gets {q} {item} and {r} {'is' if r == 1 else 'are'} left over, because {k} x {q} = {k * q} and {total} - {k * q} = {r}.",
            )
        )
    for thing, (price, pct) in zip(("jacket", "lamp"), pairs([40, 60, 80, 120, 150], [10, 20, 25, 30])):  # discount
        off = Fraction(price * pct, 100)
        sale = price - off
        q = {
            "jacket": f"A jacket normally costs ${price} and is on sale for {pct}% off. What is the sale price?",
            "lamp": f"During a {pct}% off sale, how much do you pay for a lamp whose regular price is ${price}?",
        }[thing]
        out.append(
            (
                q,
                "",
                f"{money(sale)}. The discount is {pct}% of ${price} = {money(off)}, and ${price} - {money(off)} = {money(sale)}.",
            )
        )
    for j, (avg, d1, d2) in enumerate(pairs(range(70, 89), range(-8, 9), range(-8, 9))):  # mean of three scores
        who = next(name_iter)
        a, b, c = avg + d1, avg + d2, avg - d1 - d2
        q = (
            f"{who} scored {a}, {b} and {c} on three quizzes. What is the average score?",
            f"Find the mean of {who}'s three test results: {a}, {b} and {c}.",
        )[j]
        out.append((q, "", f"{avg}. The scores add up to {a} + {b} + {c} = {a + b + c}, and {a + b + c} / 3 = {avg}."))
    for rel, (age, diff, later) in zip(("brother", "cousin"), pairs(range(6, 13), range(2, 7), range(3, 10))):  # ages
        who = next(name_iter)
        q = {
            "brother": f"{who} is {age} years old, and {who}'s brother is {diff} years older. How old will the brother be in {later} years?",
            "cousin": f"{who}'s cousin was born {diff} years before {who}, who is now {age}. What age will the cousin be {later} years from now?",
        }[rel]
        out.append(
            (
                q,
                "",
                f"{age + diff + later}. The {rel} is {age} + {diff} = {age + diff} now, and {age + diff} + {later} = {age + diff + later}.",
            )
        )
    for ingredient, (cups, servings, mult) in zip(("flour", "oats"), pairs([2, 3], [4, 6], [2, 3])):  # scaling
        q = {
            "flour": f"A recipe uses {cups} cups of flour for {servings} servings. How many cups of flour are needed for {servings * mult} servings?",
            "oats": f"A porridge recipe serves {servings} people with {cups} cups of oats. How many cups should you use to feed {servings * mult} people?",
        }[ingredient]
        out.append(
            (
                q,
                "",
                f"{cups * mult} cups. {servings * mult} servings is {mult} times the recipe, and {mult} x {cups} = {cups * mult}.",
            )
        )
    for place, (length, width) in zip(("garden", "patio"), pairs(range(6, 16), range(3, 10))):  # area
        q = {
            "garden": f"A rectangular garden is {length} m long and {width} m wide. What is its area?",
            "patio": f"How many square metres of tiles are needed to cover a rectangular patio measuring {length} m by {width} m?",
        }[place]
        out.append(
            (
                q,
                "",
                f"{length * width} square metres. Area is length times width: {length} x {width} = {length * width}.",
            )
        )
    for show, (h, m, dur) in zip(
        ("movie", "concert"), pairs(range(5, 9), [0, 15, 30, 45], [95, 105, 110, 125, 140])
    ):  # clock
        end = h * 60 + m + dur
        eh, em = divmod(end, 60)
        dh, dm = divmod(dur, 60)
        q = {
            "movie": f"A movie starts at {h}:{m:02d} p.m. and lasts {dur} minutes. What time does it end?",
            "concert": f"The concert begins at {h}:{m:02d} in the evening and runs for {dur} minutes with no break. When is it over?",
        }[show]
        out.append(
            (
                q,
                "",
                f"{eh}:{em:02d} p.m. {dur} minutes is {dh} hour{'s' if dh != 1 else ''} and {dm} minutes, and {h}:{m:02d} plus that is {eh}:{em:02d}.",
            )
        )
    for item, (n, cents) in zip(("pencil", "stamp"), pairs([4, 5, 6, 8], [35, 45, 60, 75, 85])):  # unit price
        unit = Fraction(cents, 100)
        total = n * unit
        q = {
            "pencil": f"A pack of {n} pencils costs {money(total)}. How much does each pencil cost?",
            "stamp": f"{next(name_iter)} paid {money(total)} for {n} identical stamps. What was the price of one stamp?",
        }[item]
        out.append(
            (q, "", f"{money(unit)}. Divide the total by the number of {item}s: {money(total)} / {n} = {money(unit)}.")
        )
    return out


FACTS = [
    (
        "What is the capital of Australia?",
        "",
        "The capital of Australia is Canberra, not Sydney as many people assume.",
    ),
    (
        "Who wrote the novel Pride and Prejudice?",
        "",
        "Jane Austen wrote Pride and Prejudice, which was published in 1813.",
    ),
    ("What is the chemical symbol for gold?", "", "The chemical symbol for gold is Au, from the Latin word aurum."),
    (
        "How many planets are in our solar system?",
        "",
        "There are eight planets: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
    ),
    (
        "Which gas do plants take in from the air for photosynthesis?",
        "",
        "Plants take in carbon dioxide and, using sunlight and water, turn it into sugar and oxygen.",
    ),
    (
        "What is the largest ocean on Earth?",
        "",
        "The Pacific Ocean is the largest, covering about a third of Earth's surface.",
    ),
    ("Who painted the Mona Lisa?", "", "Leonardo da Vinci painted the Mona Lisa in the early 1500s."),
    (
        "At what temperature does water boil at sea level, in degrees Celsius?",
        "",
        "Water boils at 100 degrees Celsius at sea level.",
    ),
    (
        "What is the longest bone in the human body?",
        "",
        "The femur, or thigh bone, is the longest bone in the human body.",
    ),
    (
        "In which year did humans first land on the Moon?",
        "",
        "Humans first landed on the Moon in 1969, during NASA's Apollo 11 mission.",
    ),
    (
        "Which planet is known as the Red Planet?",
        "",
        "Mars is called the Red Planet because iron oxide in its soil gives it a reddish color.",
    ),
    ("What is the hardest naturally occurring material?", "", "Diamond is the hardest naturally occurring material."),
    (
        "Which language has the most native speakers in the world?",
        "",
        "Mandarin Chinese has the most native speakers of any language.",
    ),
    (
        "What is the freezing point of water in degrees Fahrenheit?",
        "",
        "Water freezes at 32 degrees Fahrenheit, which is 0 degrees Celsius.",
    ),
    (
        "Who developed the general theory of relativity?",
        "",
        "Albert Einstein developed the general theory of relativity, publishing it in 1915.",
    ),
    ("What is the capital city of Canada?", "", "Ottawa is the capital of Canada."),
    (
        "How many continents are there on Earth?",
        "",
        "By the most common convention there are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America.",
    ),
    (
        "Which organ pumps blood around the human body?",
        "",
        "The heart pumps blood through the body's arteries and veins.",
    ),
    ("What is the main ingredient in guacamole?", "", "The main ingredient in guacamole is avocado."),
    ("What is the currency of Japan?", "", "The currency of Japan is the yen."),
    ("Which element has atomic number 1?", "", "Hydrogen has atomic number 1; it is the lightest element."),
    (
        "What is the highest mountain above sea level?",
        "",
        "Mount Everest is the highest, at about 8,849 metres above sea level.",
    ),
    (
        "Who was the first person to walk on the Moon?",
        "",
        "Neil Armstrong was the first person to walk on the Moon, on July 20, 1969.",
    ),
    (
        "Roughly how fast does light travel in a vacuum?",
        "",
        "Light travels at about 300,000 kilometres per second in a vacuum (299,792 km/s).",
    ),
    ("What is the largest planet in our solar system?", "", "Jupiter is the largest planet in our solar system."),
    ("What does the abbreviation DNA stand for?", "", "DNA stands for deoxyribonucleic acid."),
    ("What is the capital of Brazil?", "", "The capital of Brazil is Brasília."),
    ("Which river flows through Cairo?", "", "The Nile River flows through Cairo, Egypt."),
    ("What language is mainly spoken in Brazil?", "", "Portuguese is the main language of Brazil."),
    (
        "Who proposed the theory of evolution by natural selection?",
        "",
        "Charles Darwin proposed it in On the Origin of Species (1859); Alfred Russel Wallace reached the same idea independently.",
    ),
    ("What is the chemical formula for table salt?", "", "Table salt is sodium chloride, with the formula NaCl."),
]

EXTRACTION = [
    (
        "Summarize this announcement in one sentence.",
        "Starting next Monday, the Riverside Public Library will stay open until 9 p.m. on weekdays instead of 6 p.m. The change follows a survey in which most residents said they could only visit after work. Weekend hours stay the same.",
        "From next Monday, the Riverside library will stay open until 9 p.m. on weekdays because residents asked for evening hours.",
    ),
    (
        "Classify the sentiment of this review as positive, negative or mixed.",
        "The delivery was two days late and the box was crushed, but customer support refunded me within an hour.",
        "Mixed. The reviewer complains about the late, damaged delivery but praises the fast refund.",
    ),
    (
        "List every date mentioned in the text.",
        "The kickoff meeting is on March 3, the design review follows on April 14, and we plan to launch on June 1.",
        "March 3, April 14, June 1",
    ),
    (
        "Extract the names of all people mentioned in this passage.",
        "At the award dinner, Helen Park thanked her mentor, David Osei, and her co-author, Lina Moretti, for years of support.",
        "Helen Park, David Osei, Lina Moretti",
    ),
    (
        "Classify the topic of this headline as sports, politics, technology or health.",
        "New smartphone chip doubles battery life while cutting heat in half",
        "Technology",
    ),
    (
        "Extract the product, quantity and unit price from this order line as JSON.",
        "Order #5521: 3 x Ceramic Mug @ $8.50 each",
        '{"product": "Ceramic Mug", "quantity": 3, "unit_price": 8.50}',
    ),
    (
        "What is the main complaint in this customer review?",
        "I love the design of this chair and it was easy to assemble, but after two weeks the seat already squeaks every time I move.",
        "The main complaint is that the chair started squeaking after only two weeks.",
    ),
    (
        "List the ingredients mentioned in this recipe step.",
        "Whisk two eggs with a cup of milk, then stir in the flour, a pinch of salt and a spoonful of melted butter.",
        "Eggs, milk, flour, salt, melted butter",
    ),
    (
        "Find the email address in this text.",
        "Thanks for attending the workshop! Slides are available on request; just write to events@greenfield-lab.org and we'll send them.",
        "events@greenfield-lab.org",
    ),
    (
        "Decide whether this message is spam or not spam.",
        "URGENT: your account will be closed today! Verify your password now at the link below to avoid losing your money.",
        "Spam. It creates false urgency and asks for a password through a link, which are typical signs of phishing.",
    ),
    (
        "Which cities are mentioned in this travel note?",
        "We flew into Rome, spent three days in Florence, and finished the trip with a weekend in Venice.",
        "Rome, Florence and Venice",
    ),
    (
        "Summarize the key points of this passage as three short bullets.",
        "Regular walking strengthens the heart and lungs. It also helps control weight and improves mood by reducing stress. Experts suggest about 30 minutes a day on most days of the week.",
        "- Walking strengthens the heart and lungs.\n- It helps control weight and lowers stress.\n- Aim for about 30 minutes on most days.",
    ),
    (
        "Is the tone of this message formal or informal?",
        "Dear Mr. Alvarez, I am writing to request a copy of the signed agreement for our records. Kind regards, Julia Chen",
        "Formal. It uses a title and surname, complete sentences and a formal closing.",
    ),
    (
        "Using only the passage, answer: how long did the bridge take to build?",
        "The Harbor Bridge opened in 1932 after eight years of construction. It carries eight lanes of traffic and two railway lines.",
        "According to the passage, the bridge took eight years to build.",
    ),
    (
        "Extract the phone number from this notice.",
        "Lost: a gray backpack with a blue water bottle on the side. If found, please call 555-0148 after 5 p.m.",
        "555-0148",
    ),
    (
        "What action does this email ask the reader to take?",
        "Hi team, the quarterly survey closes on Friday. Please take five minutes to fill it in using the link in the staff portal. Thanks!",
        "It asks the reader to complete the quarterly survey through the staff portal before Friday.",
    ),
    (
        "How many different animals are mentioned in this passage?",
        "On the farm we saw two horses, a goat, several chickens and a sleepy dog by the gate.",
        "Four different animals: horses, a goat, chickens and a dog.",
    ),
    (
        "Extract the product, the problem and the requested fix from this support ticket as JSON.",
        "My Aero 2 headphones stopped charging yesterday. The light no longer turns on when plugged in. Please send a replacement cable.",
        '{"product": "Aero 2 headphones", "problem": "stopped charging; the light does not turn on when plugged in", "requested_fix": "send a replacement cable"}',
    ),
    (
        "Label each sentence as fact or opinion.",
        "1. Water covers most of Earth's surface. 2. Summer is the best season. 3. Paris is the capital of France.",
        "1. Fact\n2. Opinion\n3. Fact",
    ),
    (
        "What is the deadline stated in this message?",
        "Reminder: travel expense reports for May must be submitted no later than June 7 at noon.",
        "June 7 at noon.",
    ),
    (
        "Extract the author, title and year from this citation.",
        "Moreno, L. (2019). Gardens of the Dry Coast. Hillside Press.",
        "Author: L. Moreno; Title: Gardens of the Dry Coast; Year: 2019",
    ),
    (
        "Suggest a short title for this passage.",
        "Honeybees communicate the location of flowers through a movement called the waggle dance. The angle of the dance shows the direction, and its length indicates the distance.",
        "How Honeybees Dance to Share Directions",
    ),
    (
        "Which city had the highest temperature according to this report?",
        "Today's highs: Madrid 31°C, Oslo 18°C, Athens 34°C, Dublin 16°C.",
        "Athens had the highest temperature, at 34°C.",
    ),
    (
        "List the decisions recorded in these meeting notes.",
        "Discussed the budget. Agreed to move the launch to October. Ana will hire a designer. Long debate about the logo, no conclusion. Agreed to meet weekly until launch.",
        "1. Move the launch to October.\n2. Ana will hire a designer.\n3. Meet weekly until launch.",
    ),
    (
        "Identify the language of this sentence and translate it into English.",
        "¿Dónde está la estación de tren?",
        'It is Spanish. In English: "Where is the train station?"',
    ),
    (
        "Extract every quantity with its unit from this text.",
        "The hike is 12 km long, climbs 450 m, and takes about 4 hours. Bring at least 2 liters of water.",
        "12 km, 450 m, 4 hours, 2 liters",
    ),
    (
        "Does the passage support the claim that the museum is free on weekends? Answer yes or no and explain.",
        "The city museum charges $15 for adults. Entry is free for children under 12 and for everyone on the first Sunday of each month.",
        "No. The passage says entry is free only on the first Sunday of each month (and always for children under 12), not on every weekend.",
    ),
    (
        "Extract all hashtags from this social media post.",
        "Finally finished my first marathon! #running #NeverGiveUp #42km",
        "#running, #NeverGiveUp, #42km",
    ),
    (
        "Classify the customer's intent as refund, shipping or account access.",
        "I ordered a lamp ten days ago and the tracking page still says 'label created'. When will it arrive?",
        "Shipping. The customer wants to know when their order will arrive.",
    ),
    (
        "According to the passage, what caused the power outage?",
        "Thousands of homes lost power on Tuesday evening after strong winds knocked a tree onto a main transmission line. Crews restored service by midnight.",
        "Strong winds knocked a tree onto a main transmission line.",
    ),
]

# --------------------------------------------------------------------------------------------
# Held-out eval: (category, instruction, input, output, correct choice, [3 distractors])
# The correct choice is placed at index i % 4 (i = position in this list), spreading answers evenly.
# --------------------------------------------------------------------------------------------

EVAL = [
    # facts
    (
        "facts",
        "What is the capital of Japan?",
        "",
        "The capital of Japan is Tokyo.",
        "Tokyo",
        ["Kyoto", "Osaka", "Seoul"],
    ),
    (
        "facts",
        "Which planet orbits closest to the Sun?",
        "",
        "Mercury is the planet closest to the Sun.",
        "Mercury",
        ["Venus", "Mars", "Earth"],
    ),
    (
        "facts",
        "Who wrote the play Romeo and Juliet?",
        "",
        "William Shakespeare wrote Romeo and Juliet.",
        "William Shakespeare",
        ["Charles Dickens", "Christopher Marlowe", "John Milton"],
    ),
    (
        "facts",
        "What is the chemical symbol for iron?",
        "",
        "The chemical symbol for iron is Fe.",
        "Fe",
        ["Ir", "In", "Fr"],
    ),
    (
        "facts",
        "How many bones does an adult human skeleton usually have?",
        "",
        "An adult human skeleton usually has 206 bones.",
        "206",
        ["186", "212", "226"],
    ),
    (
        "facts",
        "What is the largest hot desert in the world?",
        "",
        "The Sahara is the largest hot desert in the world.",
        "The Sahara",
        ["The Gobi", "The Kalahari", "The Mojave"],
    ),
    (
        "facts",
        "Which gas makes up most of Earth's atmosphere?",
        "",
        "Nitrogen makes up most of Earth's atmosphere, about 78 percent.",
        "Nitrogen",
        ["Oxygen", "Carbon dioxide", "Argon"],
    ),
    (
        "facts",
        "In which country are the Pyramids of Giza located?",
        "",
        "The Pyramids of Giza are in Egypt.",
        "Egypt",
        ["Mexico", "Peru", "Sudan"],
    ),
    (
        "facts",
        "Which scientist formulated the three laws of motion and the law of universal gravitation?",
        "",
        "Isaac Newton formulated the three laws of motion and the law of universal gravitation.",
        "Isaac Newton",
        ["Galileo Galilei", "Albert Einstein", "Johannes Kepler"],
    ),
    (
        "facts",
        "What is the currency of the United Kingdom?",
        "",
        "The currency of the United Kingdom is the pound sterling.",
        "Pound sterling",
        ["Euro", "US dollar", "Swiss franc"],
    ),
    (
        "facts",
        "What is the largest animal living on Earth today?",
        "",
        "The blue whale is the largest animal living on Earth today.",
        "Blue whale",
        ["African elephant", "Giraffe", "Whale shark"],
    ),
    # math
    ("math", "What is 25% of 160?", "", "25% of 160 is 40.", "40", ["32", "45", "64"]),
    ("math", "Solve for x: 5x - 4 = 21.", "", "x = 5, since 5x = 25.", "5", ["4", "6", "17"]),
    ("math", "What is 12 multiplied by 13?", "", "12 multiplied by 13 is 156.", "156", ["144", "166", "169"]),
    (
        "math",
        "What is the perimeter of a square whose sides are 9 cm long?",
        "",
        "The perimeter is 4 x 9 = 36 cm.",
        "36 cm",
        ["18 cm", "27 cm", "81 cm"],
    ),
    (
        "math",
        "A shirt costs $40 and is discounted by 15%. What is the new price?",
        "",
        "The new price is $34, because 15% of $40 is $6.",
        "$34",
        ["$25", "$36", "$26"],
    ),
    (
        "math",
        "What is the least common multiple of 6 and 8?",
        "",
        "The least common multiple of 6 and 8 is 24.",
        "24",
        ["12", "48", "14"],
    ),
    ("math", "What is the mean of 4, 8, 10 and 14?", "", "The mean is 36 / 4 = 9.", "9", ["8", "10", "36"]),
    (
        "math",
        "How many minutes are there in 3.5 hours?",
        "",
        "There are 210 minutes in 3.5 hours.",
        "210",
        ["350", "180", "215"],
    ),
    ("math", "What is 3/4 + 1/8?", "", "3/4 + 1/8 = 6/8 + 1/8 = 7/8.", "7/8", ["4/12", "1/2", "5/8"]),
    (
        "math",
        "A car drives 180 km in 2 hours at a constant speed. What is its speed?",
        "",
        "Its speed is 180 / 2 = 90 km/h.",
        "90 km/h",
        ["60 km/h", "80 km/h", "360 km/h"],
    ),
    ("math", "What is 15 squared?", "", "15 squared is 225.", "225", ["215", "250", "30"]),
    # reasoning
    (
        "reasoning",
        "If today is Monday, what day of the week will it be in 9 days?",
        "",
        "It will be Wednesday, because 9 days is one week plus 2 days.",
        "Wednesday",
        ["Tuesday", "Thursday", "Sunday"],
    ),
    (
        "reasoning",
        "Lena is older than Omar, and Omar is older than Pia. Who is the youngest?",
        "",
        "Pia is the youngest.",
        "Pia",
        ["Lena", "Omar", "They are the same age"],
    ),
    (
        "reasoning",
        "What number comes next: 1, 4, 9, 16, 25?",
        "",
        "The next number is 36, the square of 6.",
        "36",
        ["30", "35", "49"],
    ),
    (
        "reasoning",
        "Which word does not belong with the others: violin, cello, trumpet, viola?",
        "",
        "Trumpet does not belong; it is a brass instrument and the others are string instruments.",
        "Trumpet",
        ["Violin", "Cello", "Viola"],
    ),
    (
        "reasoning",
        "Every bird in the aviary is a parrot. Kiwi is a bird in the aviary. What is Kiwi?",
        "",
        "Kiwi is a parrot.",
        "A parrot",
        ["A penguin", "An owl", "A pigeon"],
    ),
    (
        "reasoning",
        "Cup is to coffee as bowl is to what?",
        "",
        "Bowl is to soup, just as cup is to coffee.",
        "Soup",
        ["Spoon", "Plate", "Table"],
    ),
    (
        "reasoning",
        "If the day before yesterday was Friday, what day will tomorrow be?",
        "",
        "Tomorrow will be Monday, because today is Sunday.",
        "Monday",
        ["Sunday", "Saturday", "Tuesday"],
    ),
    (
        "reasoning",
        "Which lasts longer: 2 hours or 130 minutes?",
        "",
        "130 minutes lasts longer, since 2 hours is only 120 minutes.",
        "130 minutes",
        ["2 hours", "They are equal", "It cannot be determined"],
    ),
    (
        "reasoning",
        "A bus leaves at 10:50 and the ride takes 1 hour 25 minutes. When does it arrive?",
        "",
        "The bus arrives at 12:15.",
        "12:15",
        ["12:05", "11:15", "12:25"],
    ),
    (
        "reasoning",
        "Three friends each shake hands with every other friend exactly once. How many handshakes take place?",
        "",
        "Three handshakes take place.",
        "3",
        ["6", "2", "9"],
    ),
    (
        "reasoning",
        "Which letter comes next in the series B, D, F, H?",
        "",
        "The next letter is J.",
        "J",
        ["I", "K", "L"],
    ),
    # coding
    ("coding", 'What does len("hello") return in Python?', "", 'len("hello") returns 5.', "5", ["4", "6", "0"]),
    (
        "coding",
        "Which keyword starts a function definition in Python?",
        "",
        "Python functions are defined with the def keyword.",
        "def",
        ["func", "function", "define"],
    ),
    ("coding", "What does print(2 ** 3) output in Python?", "", "print(2 ** 3) outputs 8.", "8", ["6", "9", "23"]),
    (
        "coding",
        "Which data structure removes items in last-in, first-out order?",
        "",
        "A stack removes items in last-in, first-out order.",
        "Stack",
        ["Queue", "Heap", "Hash table"],
    ),
    (
        "coding",
        "In Python, what is the value of 10 % 3?",
        "",
        "10 % 3 is 1, the remainder of 10 divided by 3.",
        "1",
        ["3", "0", "3.33"],
    ),
    (
        "coding",
        "What does this Python snippet print?",
        "nums = [3, 1, 2]\nnums.sort()\nprint(nums[0])",
        "It prints 1, the smallest value after sorting.",
        "1",
        ["3", "2", "[1, 2, 3]"],
    ),
    (
        "coding",
        "Which SQL clause filters rows before they are grouped?",
        "",
        "The WHERE clause filters rows before grouping.",
        "WHERE",
        ["HAVING", "ORDER BY", "LIMIT"],
    ),
    (
        "coding",
        "What is the time complexity of binary search on a sorted array?",
        "",
        "Binary search runs in O(log n) time.",
        "O(log n)",
        ["O(n)", "O(n log n)", "O(1)"],
    ),
    (
        "coding",
        "Which of these built-in Python types is immutable?",
        "",
        "The tuple is immutable.",
        "tuple",
        ["list", "dict", "set"],
    ),
    (
        "coding",
        "What does the HTML <a> tag create?",
        "",
        "The <a> tag creates a hyperlink.",
        "A hyperlink",
        ["An image", "A table", "A heading"],
    ),
    (
        "coding",
        'What does bool("") evaluate to in Python?',
        "",
        'bool("") is False, because an empty string is falsy.',
        "False",
        ["True", "None", "An error"],
    ),
    # writing
    (
        "writing",
        "Which spelling is correct?",
        "",
        'The correct spelling is "necessary".',
        "necessary",
        ["neccessary", "necesary", "neccesary"],
    ),
    (
        "writing",
        'Which word is a synonym of "happy"?',
        "",
        '"Joyful" is a synonym of "happy".',
        "Joyful",
        ["Gloomy", "Tired", "Angry"],
    ),
    (
        "writing",
        "Which greeting is the most appropriate for a formal business email?",
        "",
        '"Dear Ms. Patel," is the most appropriate formal greeting.',
        "Dear Ms. Patel,",
        ["Hey Patel!", "Yo,", "Sup Ms. Patel"],
    ),
    (
        "writing",
        'Which sentence uses "their" correctly?',
        "",
        '"Their house is on the hill." uses "their" correctly.',
        "Their house is on the hill.",
        ["Their going to the store.", "Put the box over their.", "Their is no milk left."],
    ),
    (
        "writing",
        'What is an antonym of "generous"?',
        "",
        '"Stingy" is an antonym of "generous".',
        "Stingy",
        ["Kind", "Giving", "Wealthy"],
    ),
    (
        "writing",
        "Rewrite the sentence in the active voice.",
        "The letter was written by Maria.",
        'In the active voice: "Maria wrote the letter."',
        "Maria wrote the letter.",
        ["The letter wrote Maria.", "Maria was written the letter.", "The letter was by Maria written."],
    ),
    (
        "writing",
        "Which word best fills the blank?",
        "She was so ___ that she fell asleep during the movie.",
        'The best word is "tired": she was so tired that she fell asleep.',
        "tired",
        ["excited", "hungry", "loud"],
    ),
    (
        "writing",
        "What rhyme scheme does a limerick follow?",
        "",
        "A limerick follows the AABBA rhyme scheme.",
        "AABBA",
        ["ABAB", "AABB", "ABCABC"],
    ),
    (
        "writing",
        "How many syllables does the first line of a traditional haiku have?",
        "",
        "The first line of a traditional haiku has five syllables.",
        "Five",
        ["Seven", "Three", "Nine"],
    ),
    (
        "writing",
        "Which sentence is punctuated correctly?",
        "",
        '"It\'s raining, so bring an umbrella." is punctuated correctly.',
        "It's raining, so bring an umbrella.",
        [
            "Its raining so, bring an umbrella.",
            "It's raining so bring, an umbrella.",
            "Its' raining, so bring an umbrella.",
        ],
    ),
    (
        "writing",
        'What is the plural of "child"?',
        "",
        'The plural of "child" is "children".',
        "children",
        ["childs", "childes", "childrens"],
    ),
    # extraction
    (
        "extraction",
        "What is the sentiment of this product review?",
        "The battery lasts all day and the screen is gorgeous. Best purchase I've made this year.",
        "The sentiment is positive.",
        "Positive",
        ["Negative", "Neutral", "Mixed"],
    ),
    (
        "extraction",
        "By what date must applications be submitted?",
        "Please submit your application by September 30 to be considered for the fall term.",
        "Applications must be submitted by September 30.",
        "September 30",
        ["October 30", "September 3", "August 30"],
    ),
    (
        "extraction",
        "Based on the passage, in which city did Marta land?",
        "After landing in Lisbon, Marta took a train north to spend a week with her aunt in Porto.",
        "Marta landed in Lisbon.",
        "Lisbon",
        ["Porto", "Madrid", "Seville"],
    ),
    (
        "extraction",
        "Which topic best describes this news sentence?",
        "The central bank raised interest rates by a quarter point in an effort to slow inflation.",
        "The sentence is about economics.",
        "Economics",
        ["Sports", "Health", "Technology"],
    ),
    (
        "extraction",
        "How should this email be classified?",
        "Congratulations! You have won a free cruise. Click this link and enter your card number to claim your prize.",
        "This email is spam.",
        "Spam",
        ["Not spam", "Newsletter", "Personal message"],
    ),
    (
        "extraction",
        "What email address is given in this notice?",
        "For questions, write to help@northwind-tools.com or call us during office hours.",
        "The email address is help@northwind-tools.com.",
        "help@northwind-tools.com",
        ["northwind-tools.com", "help@northwind.com", "office@northwind-tools.com"],
    ),
    (
        "extraction",
        "How many people are mentioned in this sentence?",
        "Ravi, Elena and Tom met at the station, and Tom's sister joined them later.",
        "Four people are mentioned: Ravi, Elena, Tom and Tom's sister.",
        "4",
        ["3", "2", "5"],
    ),
    (
        "extraction",
        "What does the guest complain about in this hotel review?",
        "The room was spotless and the staff were friendly, but the street noise kept us awake all night.",
        "The guest complains about the street noise.",
        "Street noise",
        ["A dirty room", "Rude staff", "A high price"],
    ),
    (
        "extraction",
        "What is the customer asking for in this message?",
        "I was charged twice for order 4471. Please return the extra payment to my card.",
        "The customer is asking for a refund of the duplicate charge.",
        "A refund",
        ["Shipping information", "A password reset", "A product review"],
    ),
    (
        "extraction",
        "In which language is this sentence written?",
        "Je voudrais un café, s'il vous plaît.",
        "The sentence is written in French.",
        "French",
        ["Spanish", "Italian", "Portuguese"],
    ),
    (
        "extraction",
        "How much does the premium plan cost according to the text?",
        "The premium plan costs $12 per month, while the basic plan is free.",
        "The premium plan costs $12 per month.",
        "$12 per month",
        ["$12 per year", "$21 per month", "Nothing"],
    ),
]


# --------------------------------------------------------------------------------------------


def build_seed() -> list[dict]:
    rows: list[dict] = []
    for ins, inp, out in REASONING:
        rows.append({"instruction": ins, "input": inp, "output": out, "category": "reasoning"})
    for ins, inp, out in WRITING:
        rows.append({"instruction": ins, "input": inp, "output": out, "category": "writing"})
    for ins, inp, out, _test in CODING:
        rows.append({"instruction": ins, "input": inp, "output": out, "category": "coding"})
    for ins, inp, out in MATH_HAND + generated_math():
        rows.append({"instruction": ins, "input": inp, "output": out, "category": "math"})
    for ins, inp, out in FACTS:
        rows.append({"instruction": ins, "input": inp, "output": out, "category": "facts"})
    for ins, inp, out in EXTRACTION:
        rows.append({"instruction": ins, "input": inp, "output": out, "category": "extraction"})
    # interleave categories so any prefix of the file is balanced
    by_cat = {c: [r for r in rows if r["category"] == c] for c in CATEGORIES}
    mixed: list[dict] = []
    for i in range(max(len(v) for v in by_cat.values())):
        for c in CATEGORIES:
            if i < len(by_cat[c]):
                mixed.append(by_cat[c][i])
    return mixed


def build_eval() -> list[dict]:
    items: list[dict] = []
    for i, (cat, ins, inp, out, correct, distractors) in enumerate(EVAL):
        k = i % 4
        choices = list(distractors)
        choices.insert(k, correct)
        items.append(
            {"instruction": ins, "input": inp, "output": out, "choices": choices, "answer_index": k, "category": cat}
        )
    return items


# --------------------------------------------------------------------------------------------
# Large held-out eval (data/eval_large.jsonl): the 66 items above plus new ones, for the
# downstream benchmark. New items: (category, instruction, input, output, correct, [3 distractors]).
# Generated ones compute their answer exactly; the correct position is drawn with a fixed seed.
# --------------------------------------------------------------------------------------------

LARGE_SEED = 8191
LARGE_NAMES = [
    "Bea",
    "Idris",
    "Yara",
    "Conor",
    "Mei",
    "Tobias",
    "Lina",
    "Arjun",
    "Freya",
    "Dario",
    "Nadia",
    "Hugo",
    "Sana",
    "Emil",
    "Rosa",
    "Jonah",
    "Kofi",
    "Ingrid",
    "Farah",
    "Milo",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _num(x: Fraction | int) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{float(x):g}"


def _pick(correct: str, candidates, n: int = 3) -> list[str]:
    """The first n candidates that differ from the answer and from each other (after _norm)."""
    seen = {_norm(correct)}
    out: list[str] = []
    for c in candidates:
        c = str(c)
        if _norm(c) not in seen and c.strip():
            seen.add(_norm(c))
            out.append(c)
        if len(out) == n:
            return out
    raise AssertionError(f"not enough distractors for {correct!r}: {out}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def large_reasoning(rng: random.Random) -> list[tuple]:
    out: list[tuple] = []
    # weekday arithmetic: n % 7 in 2..5, so the start day and the days either side of the answer differ
    ns = rng.sample([n for n in range(9, 75) if n % 7 in (2, 3, 4, 5)], 7)
    for i, n in enumerate(ns):
        s = (i * 3) % 7
        a = (s + n) % 7
        w, d = divmod(n, 7)
        out.append(
            (
                "reasoning",
                f"Which weekday falls {n} days after a {DAYS[s]}?",
                "",
                f"It is a {DAYS[a]}: {n} days is {_plural(w, 'week')} and {_plural(d, 'day')}, and {_plural(d, 'day')} after {DAYS[s]} comes {DAYS[a]}.",
                DAYS[a],
                [DAYS[(a - 1) % 7], DAYS[(a + 1) % 7], DAYS[s]],
            )
        )
    # sequences
    for kind in ("arith", "arith", "arith", "geom", "geom", "grow", "grow"):
        if kind == "arith":
            a0, d = rng.randint(2, 30), rng.choice([3, 4, 6, 7, 8, 9, 11, 12])
            seq = [a0 + d * k for k in range(5)]
            ans = seq[-1] + d
            why = f"Each term is {d} more than the one before, so the next one is {seq[-1]} + {d} = {ans}."
            cands = [ans + 1, ans - 1, ans + d, ans - 2]
        elif kind == "geom":
            a0, r = rng.choice([(2, 3), (3, 2), (5, 2), (1, 4), (4, 3)])
            seq = [a0 * r**k for k in range(5)]
            ans = seq[-1] * r
            why = f"Each term is {r} times the one before, so the next one is {seq[-1]} x {r} = {ans}."
            cands = [seq[-1] + (seq[-1] - seq[-2]), ans + r, ans - r]
        else:
            a0, g0, k = rng.randint(1, 9), rng.randint(2, 5), rng.choice([2, 3])
            seq = [a0]
            for j in range(4):
                seq.append(seq[-1] + g0 + k * j)
            g = g0 + 4 * k
            ans = seq[-1] + g
            gaps = ", ".join(str(seq[j + 1] - seq[j]) for j in range(4))
            why = f"The differences between terms are {gaps}, rising by {k} each step; the next difference is {g}, and {seq[-1]} + {g} = {ans}."
            cands = [seq[-1] + (g - k), ans + 1, ans - 1, ans + k]
        out.append(
            (
                "reasoning",
                f"Which number continues the sequence {', '.join(map(str, seq))}?",
                "",
                f"{ans}. {why}",
                str(ans),
                _pick(str(ans), cands),
            )
        )
    # three-way comparisons
    comps = [
        ("taller", "tallest", "shortest"),
        ("older", "oldest", "youngest"),
        ("faster", "fastest", "slowest"),
        ("heavier", "heaviest", "lightest"),
        ("richer", "richest", "poorest"),
        ("louder", "loudest", "quietest"),
    ]
    names = LARGE_NAMES[:]
    rng.shuffle(names)
    for i, (comp, top, bottom) in enumerate(comps):
        A, B, C = names[3 * i : 3 * i + 3]
        if i % 2 == 0:
            sup, ans = top, C
            why = f"{C} is {comp} than {A}, and {A} is {comp} than {B}, so {C} is ahead of both."
        else:
            sup, ans = bottom, B
            why = f"{A} is {comp} than {B}, and {C} is {comp} than {A}, so {B} comes behind both."
        others = [x for x in (A, B, C) if x != ans]
        out.append(
            (
                "reasoning",
                f"{A} is {comp} than {B}, and {C} is {comp} than {A}. Who is the {sup}?",
                "",
                f"{ans} is the {sup}. {why}",
                ans,
                others + ["It cannot be determined"],
            )
        )
    # 24-hour clock
    for _ in range(4):
        start = rng.randint(13, 23) * 60 + rng.choice([5, 15, 20, 35, 40, 50])
        dh, dm = rng.randint(2, 9), rng.choice([25, 30, 45, 55])
        hm = lambda t: f"{(t // 60) % 24:02d}:{t % 60:02d}"
        ans, mid = start + dh * 60 + dm, start + dh * 60
        out.append(
            (
                "reasoning",
                f"On a 24-hour clock it is {hm(start)}. What time will it show {dh} hours and {dm} minutes later?",
                "",
                f"It will show {hm(ans)}. Adding {dh} hours to {hm(start)} gives {hm(mid)}, and {dm} more minutes makes {hm(ans)}.",
                hm(ans),
                _pick(hm(ans), [hm(ans + 60), hm(ans - 60), hm(mid), hm(ans + 30)]),
            )
        )
    out += [
        (
            "reasoning",
            "All violinists in the orchestra read music, and Jonah is a violinist in the orchestra. Does Jonah read music?",
            "",
            "Yes. Every violinist in the orchestra reads music, and Jonah is one of them.",
            "Yes",
            ["No", "Only sometimes", "It cannot be determined"],
        ),
        (
            "reasoning",
            "No fish in the pond can fly, and Goldie is a fish in the pond. Can Goldie fly?",
            "",
            "No. No fish in the pond can fly, and Goldie is a fish in the pond.",
            "No",
            ["Yes", "Only at night", "It cannot be determined"],
        ),
        (
            "reasoning",
            "Which item does not belong with the others: hammer, saw, wrench, tulip?",
            "",
            "The tulip does not belong: it is a flower, while the others are tools.",
            "Tulip",
            ["Hammer", "Saw", "Wrench"],
        ),
        (
            "reasoning",
            "Pen is to writer as brush is to whom?",
            "",
            "A painter. A writer works with a pen, and a painter works with a brush.",
            "Painter",
            ["Dentist", "Barber", "Sculptor"],
        ),
        (
            "reasoning",
            "A farmer has 17 sheep and all but 9 run away. How many sheep does the farmer have left?",
            "",
            'The farmer has 9 sheep left, because "all but 9" ran away.',
            "9",
            ["8", "17", "26"],
        ),
    ]
    return out


def large_math(rng: random.Random) -> list[tuple]:
    out: list[tuple] = []
    names = LARGE_NAMES[:]
    rng.shuffle(names)
    who = iter(names)
    # rounding up: how many containers
    for thing, unit, verb in (("students", "bus", "seats"), ("books", "box", "holds"), ("guests", "table", "seats")):
        k = rng.randint(6, 14) if thing != "students" else rng.choice([40, 45, 50])
        n = rng.randint(3 * k + 1, 7 * k - 1)
        while n % k == 0:
            n += 1
        q, r = divmod(n, k)
        ans = q + 1
        units = unit + ("es" if unit.endswith(("s", "x")) else "s")
        ins = {
            "students": f"{n} students are going on a school trip, and each bus seats {k}. How many buses are needed?",
            "books": f"A library is packing {n} books into boxes that hold {k} books each. How many boxes does it need?",
            "guests": f"Each table at a wedding seats {k} guests. How many tables are needed for {n} guests?",
        }[thing]
        out.append(
            (
                "math",
                ins,
                "",
                f"{ans} {units}. {n} / {k} is {q} with {r} left over, and the remaining {_plural(r, thing[:-1])} need{'s' if r == 1 else ''} one more {unit}.",
                str(ans),
                [str(q), str(ans + 1), str(q - 1)],
            )
        )
    # percentage increase
    for ctx in ("town", "salary", "rent"):
        base = rng.choice([200, 400, 500, 800, 1200, 1500, 2500])
        pct = rng.choice([5, 10, 15, 20, 30])
        inc = base * pct // 100
        ans = base + inc
        if ctx == "town":
            ins, unit = f"A village of {base} people grows by {pct}% in one year. What is its new population?", ""
            fmt = lambda v: str(v)
            out_s = f"{ans} people. {pct}% of {base} is {inc}, and {base} + {inc} = {ans}."
        else:
            fmt = lambda v: f"${v}"
            ins = {
                "salary": f"{next(who)} earns ${base} a month and gets a {pct}% raise. What is the new monthly pay?",
                "rent": f"A monthly rent of ${base} goes up by {pct}%. What is the new rent?",
            }[ctx]
            out_s = f"${ans}. The increase is {pct}% of ${base} = ${inc}, and ${base} + ${inc} = ${ans}."
        out.append(
            (
                "math",
                ins,
                "",
                out_s,
                fmt(ans),
                _pick(fmt(ans), [fmt(base + pct), fmt(ans + inc), fmt(base - inc), fmt(inc)]),
            )
        )
    # unit conversions
    for big, small, factor, wrong in (
        ("kilometres", "metres", 1000, [100, 10000, 10]),
        ("kilograms", "grams", 1000, [100, 10000, 10]),
        ("metres", "centimetres", 100, [10, 1000, 60]),
        ("litres", "millilitres", 1000, [100, 10, 10000]),
        ("days", "hours", 24, [12, 60, 20]),
        ("hours", "seconds", 3600, [60, 360, 600]),
    ):
        v = Fraction(rng.choice(["1.5", "2.5", "3.2", "4.5", "0.75", "6", "2.4", "7"]))
        if big in ("days", "hours"):
            v = Fraction(rng.randint(2, 9))
        ans = v * factor
        unit_big = big[:-1] if v == 1 else big
        out.append(
            (
                "math",
                f"How many {small} are in {_num(v)} {unit_big}?",
                "",
                f"There are {_num(ans)} {small} in {_num(v)} {unit_big}: one {big[:-1]} is {factor} {small}, and {_num(v)} x {factor} = {_num(ans)}.",
                _num(ans),
                [_num(v * w) for w in wrong],
            )
        )
    # saving towards a goal
    for _ in range(2):
        s, w = rng.choice([6, 8, 12, 15, 25]), rng.randint(5, 12)
        goal = s * w
        name = next(who)
        out.append(
            (
                "math",
                f"{name} puts ${s} into savings every week. After how many weeks will {name} have ${goal}?",
                "",
                f"After {w} weeks, since ${goal} / ${s} = {w}.",
                str(w),
                [str(w - 1), str(w + 1), str(w + 2)],
            )
        )
    # fraction of a quantity
    for a, b in ((2, 3), (3, 5), (5, 8)):
        n = b * rng.randint(4, 15)
        ans = n * a // b
        out.append(
            (
                "math",
                f"What is {a}/{b} of {n}?",
                "",
                f"{a}/{b} of {n} is {ans}: one {['', '', 'half', 'third', 'fourth', 'fifth', 'sixth', 'seventh', 'eighth'][b]} of {n} is {n // b}, and {a} x {n // b} = {ans}.",
                str(ans),
                _pick(str(ans), [n // b, ans + n // b, n - ans, ans - 1, ans + 1]),
            )
        )
    # two-digit multiplication
    for _ in range(3):
        a, b = rng.randint(14, 29), rng.randint(11, 19)
        ans = a * b
        out.append(
            (
                "math",
                f"What is {a} x {b}?",
                "",
                f"{a} x {b} = {ans}.",
                str(ans),
                _pick(str(ans), [ans + 10, ans - 10, a * (b + 1), ans + 1]),
            )
        )
    # perimeter of a rectangle
    for place in ("field", "pen"):
        L, W = rng.randint(12, 40), rng.randint(5, 11)
        ans = 2 * (L + W)
        ins = {
            "field": f"A rectangular field is {L} m long and {W} m wide. How many metres of fence are needed to go all the way around it?",
            "pen": f"How much fencing, in metres, encloses a rectangular animal pen that measures {L} m by {W} m?",
        }[place]
        out.append(
            (
                "math",
                ins,
                "",
                f"{ans} metres. The perimeter is 2 x ({L} + {W}) = {ans} m.",
                f"{ans} m",
                _pick(f"{ans} m", [f"{L * W} m", f"{L + W} m", f"{2 * L + W} m", f"{ans + 2} m"]),
            )
        )
    # sharing in a ratio
    for p, q in ((3, 2), (2, 5)):
        unit = rng.randint(4, 12) * 5
        total = unit * (p + q)
        A, B = next(who), next(who)
        ans = unit * p
        out.append(
            (
                "math",
                f"{A} and {B} share ${total} in the ratio {p}:{q}. How much does {A} receive?",
                "",
                f"{A} receives ${ans}. There are {p} + {q} = {p + q} equal parts of ${total} / {p + q} = ${unit}, and {A} gets {p} of them.",
                f"${ans}",
                _pick(f"${ans}", [f"${unit * q}", f"${unit}", f"${total // 2}", f"${ans + unit}"]),
            )
        )
    # travel time
    for _ in range(2):
        v, t = rng.choice([40, 50, 60, 70, 80, 90]), rng.randint(2, 6)
        d = v * t
        out.append(
            (
                "math",
                f"How many hours does a {d} km journey take at a steady {v} km/h?",
                "",
                f"It takes {t} hours, because time is distance divided by speed: {d} / {v} = {t}.",
                f"{t} hours",
                [f"{t - 1} hours", f"{t + 1} hours", f"{t + 2} hours"],
            )
        )
    # greatest common divisor
    for g in (12, 18):
        x, y = rng.choice([(2, 3), (3, 4), (4, 5), (3, 5), (5, 7)])
        a, b = g * x, g * y
        common = [c for c in range(2, g) if a % c == 0 and b % c == 0]
        out.append(
            (
                "math",
                f"What is the greatest common divisor of {a} and {b}?",
                "",
                f"{g}. {a} = {g} x {x} and {b} = {g} x {y}, and {x} and {y} share no factor other than 1.",
                str(g),
                _pick(str(g), sorted(common, reverse=True) + [a * b // g]),
            )
        )
    return out


# (code, expected stdout, distractors, why). One-line snippets go into the instruction; longer ones
# into the input. The build runs every snippet and asserts its output equals the expected answer.
LARGE_SNIPPETS = [
    ('print(len("mississippi"))', "11", ["10", "12", "4"], "the string has 11 characters"),
    ('print("ab" * 3)', "ababab", ["ab3", "ab ab ab", "aaabbb"], "multiplying a string by 3 repeats it three times"),
    ("print([10, 20, 30][-1])", "30", ["10", "20", "IndexError"], "index -1 selects the last item"),
    ("print(7 / 2)", "3.5", ["3", "4", "3.0"], "the / operator always does true division"),
    ('print("Python"[1:4])', "yth", ["Pyt", "ytho", "thon"], "the slice takes the characters at positions 1, 2 and 3"),
    (
        "print(sorted([3, 1, 2], reverse=True))",
        "[3, 2, 1]",
        ["[1, 2, 3]", "[2, 1, 3]", "[3, 1, 2]"],
        "reverse=True sorts from largest to smallest",
    ),
    ('print(int("42") + 8)', "50", ["428", "42 8", "TypeError"], 'int("42") turns the string into the number 42'),
    ('print("42" + "8")', "428", ["50", "42 8", "TypeError"], "adding two strings joins them"),
    ("print(round(3.7))", "4", ["3", "3.7", "4.0"], "round() with one argument returns the nearest integer"),
    (
        "print(list(range(2, 10, 3)))",
        "[2, 5, 8]",
        ["[2, 5, 8, 11]", "[3, 6, 9]", "[2, 4, 6, 8]"],
        "the range starts at 2, steps by 3 and stops before 10",
    ),
    ("print(min([4, -2, 7]))", "-2", ["4", "7", "2"], "-2 is the smallest value in the list"),
    (
        'print("a,b,,c".split(","))',
        "['a', 'b', '', 'c']",
        ["['a', 'b', 'c']", "['a,b,,c']", "['a', 'b', ',', 'c']"],
        "splitting on every comma leaves an empty string between the two adjacent commas",
    ),
    (
        "print([1, 2, 3] * 2)",
        "[1, 2, 3, 1, 2, 3]",
        ["[2, 4, 6]", "[[1, 2, 3], [1, 2, 3]]", "[1, 1, 2, 2, 3, 3]"],
        "multiplying a list repeats its items",
    ),
    ('print(bool("0"))', "True", ["False", "0", "None"], 'any non-empty string is truthy, even "0"'),
    ("print(3 == 3.0)", "True", ["False", "None", "TypeError"], "an int and a float with the same value compare equal"),
    (
        "print(len({1, 2, 2, 3}))",
        "3",
        ["4", "2", "1"],
        "a set keeps only distinct values, so the duplicate 2 counts once",
    ),
    ("print(sum(range(5)))", "10", ["15", "5", "4"], "range(5) is 0 to 4, and 0 + 1 + 2 + 3 + 4 = 10"),
    (
        'print("-".join(["2024", "06", "01"]))',
        "2024-06-01",
        ["20240601", "2024 06 01", "['2024', '06', '01']"],
        "join puts the separator between the items",
    ),
    (
        'print(max("apple", "fig", "kiwi"))',
        "kiwi",
        ["apple", "fig", "apple fig kiwi"],
        'strings compare alphabetically, and "kiwi" comes last',
    ),
    (
        'd = {"a": 1}\nd["b"] = 2\nd["a"] = 3\nprint(d)',
        "{'a': 3, 'b': 2}",
        ["{'a': 1, 'b': 2}", "{'b': 2, 'a': 3}", "{'a': 1, 'b': 2, 'a': 3}"],
        "assigning to an existing key replaces its value but keeps its place",
    ),
    (
        "total = 0\nfor i in range(1, 5):\n    total += i * i\nprint(total)",
        "30",
        ["14", "10", "55"],
        "it adds the squares 1 + 4 + 9 + 16",
    ),
    (
        's = "banana"\nprint(s.count("a"), s.find("n"))',
        "3 2",
        ["3 3", "2 2", "3 1"],
        "there are three a's, and the first n is at index 2",
    ),
    (
        "def f(x, y=2):\n    return x * y\n\nprint(f(3), f(3, 3))",
        "6 9",
        ["5 6", "6 6", "9 9"],
        "the first call uses the default y=2 and the second passes y=3",
    ),
    (
        'words = ["kiwi", "fig", "banana"]\nprint(sorted(words, key=len))',
        "['fig', 'kiwi', 'banana']",
        ["['banana', 'fig', 'kiwi']", "['banana', 'kiwi', 'fig']", "['kiwi', 'fig', 'banana']"],
        "key=len sorts the words from shortest to longest",
    ),
    (
        "a = [1, 2]\nb = a[:]\nb.append(3)\nprint(len(a))",
        "2",
        ["3", "1", "0"],
        "a[:] makes a copy, so appending to b leaves a unchanged",
    ),
]
LARGE_SNIPPET_WORDING = [
    "What does {code} output in Python?",
    "In Python, what does {code} print?",
    "What is printed by {code} in Python?",
]
LARGE_SNIPPET_PROMPTS = [
    "What does this Python code print after updating a dictionary?",
    "What does this loop print?",
    "What do these two string methods print?",
    "What does this function call with a default argument print?",
    "What does this Python code print after sorting by length?",
    "What does this list-copying snippet print?",
]

CODING_CONCEPTS = [
    (
        "coding",
        "Which HTTP status code means that the requested resource was not found?",
        "",
        "Status code 404 means Not Found.",
        "404",
        ["500", "403", "200"],
    ),
    (
        "coding",
        "Which git command records staged changes in the repository history?",
        "",
        "git commit records the staged changes.",
        "git commit",
        ["git push", "git add", "git stash"],
    ),
    (
        "coding",
        "Which SQL keyword removes duplicate rows from a query result?",
        "",
        "SELECT DISTINCT removes duplicate rows.",
        "DISTINCT",
        ["UNIQUE", "GROUP", "FILTER"],
    ),
    (
        "coding",
        "What does JSON stand for?",
        "",
        "JSON stands for JavaScript Object Notation.",
        "JavaScript Object Notation",
        ["Java Serialized Object Network", "JavaScript Online Notation", "Joint Standard Object Notation"],
    ),
    (
        "coding",
        "Which Python keyword catches an exception raised inside a try block?",
        "",
        "The except keyword catches exceptions raised in a try block.",
        "except",
        ["catch", "finally", "rescue"],
    ),
    (
        "coding",
        "At what index is the first element of a Python list?",
        "",
        "The first element of a Python list is at index 0.",
        "0",
        ["1", "-1", "None"],
    ),
    (
        "coding",
        "Which CSS property sets the text color of an element?",
        "",
        "The color property sets the text color.",
        "color",
        ["font-color", "text-color", "foreground"],
    ),
]


def _run_snippet(code: str) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})
    return buf.getvalue().strip()


def large_coding() -> list[tuple]:
    out: list[tuple] = []
    n_multi = 0
    for i, (code, expected, distractors, why) in enumerate(LARGE_SNIPPETS):
        got = _run_snippet(code)
        assert got == expected, (code, got, expected)
        if "\n" in code:
            ins, inp = LARGE_SNIPPET_PROMPTS[n_multi], code
            n_multi += 1
        else:
            ins, inp = LARGE_SNIPPET_WORDING[i % 3].format(code=code), ""
        out.append(("coding", ins, inp, f"It prints {expected}, because {why}.", expected, distractors))
    return out + CODING_CONCEPTS


FACTS_LARGE = [
    ("What is the capital of Italy?", "Rome is the capital of Italy.", "Rome", ["Milan", "Naples", "Florence"]),
    (
        "What is the capital of Kenya?",
        "Nairobi is the capital of Kenya.",
        "Nairobi",
        ["Mombasa", "Kampala", "Addis Ababa"],
    ),
    ("What is the capital of Spain?", "Madrid is the capital of Spain.", "Madrid", ["Barcelona", "Lisbon", "Seville"]),
    (
        "Which planet is famous for its large, bright ring system?",
        "Saturn is famous for its large, bright rings.",
        "Saturn",
        ["Jupiter", "Uranus", "Neptune"],
    ),
    (
        "Who wrote the novel Nineteen Eighty-Four?",
        "George Orwell wrote Nineteen Eighty-Four.",
        "George Orwell",
        ["Aldous Huxley", "Ray Bradbury", "H. G. Wells"],
    ),
    ("What is the chemical symbol for sodium?", "The chemical symbol for sodium is Na.", "Na", ["So", "Sd", "S"]),
    ("How many legs does a spider have?", "A spider has eight legs.", "Eight", ["Six", "Ten", "Twelve"]),
    (
        "Which organ of the human body produces insulin?",
        "The pancreas produces insulin.",
        "The pancreas",
        ["The liver", "The kidneys", "The gallbladder"],
    ),
    (
        "Which metal is liquid at room temperature?",
        "Mercury is a metal that is liquid at room temperature.",
        "Mercury",
        ["Lead", "Aluminium", "Tin"],
    ),
    (
        "Who was the first President of the United States?",
        "George Washington was the first President of the United States.",
        "George Washington",
        ["Thomas Jefferson", "Abraham Lincoln", "John Adams"],
    ),
    (
        "Which ocean lies between Africa and Australia?",
        "The Indian Ocean lies between Africa and Australia.",
        "The Indian Ocean",
        ["The Atlantic Ocean", "The Arctic Ocean", "The Pacific Ocean"],
    ),
    (
        "Which river carries the most water in the world and flows through Brazil?",
        "The Amazon carries the most water of any river and flows through Brazil.",
        "The Amazon",
        ["The Nile", "The Orinoco", "The Paraná"],
    ),
    ("In which city is the Eiffel Tower?", "The Eiffel Tower is in Paris.", "Paris", ["Lyon", "Brussels", "Marseille"]),
    (
        "What is the largest country in the world by area?",
        "Russia is the largest country in the world by area.",
        "Russia",
        ["Canada", "China", "The United States"],
    ),
    (
        "Who painted The Starry Night?",
        "Vincent van Gogh painted The Starry Night.",
        "Vincent van Gogh",
        ["Claude Monet", "Pablo Picasso", "Paul Cézanne"],
    ),
    (
        "Which vitamin does human skin make when it is exposed to sunlight?",
        "Skin makes vitamin D when it is exposed to sunlight.",
        "Vitamin D",
        ["Vitamin C", "Vitamin A", "Vitamin B12"],
    ),
    ("How many days are there in a leap year?", "A leap year has 366 days.", "366", ["365", "364", "367"]),
    (
        "Which blood cells carry oxygen around the body?",
        "Red blood cells carry oxygen around the body.",
        "Red blood cells",
        ["White blood cells", "Platelets", "Plasma cells"],
    ),
    (
        "What currency do most countries of the European Union use?",
        "Most European Union countries use the euro.",
        "The euro",
        ["The pound", "The franc", "The dollar"],
    ),
    (
        "Who discovered penicillin?",
        "Alexander Fleming discovered penicillin in 1928.",
        "Alexander Fleming",
        ["Louis Pasteur", "Marie Curie", "Joseph Lister"],
    ),
    (
        "On which continent is Argentina?",
        "Argentina is in South America.",
        "South America",
        ["North America", "Africa", "Europe"],
    ),
    (
        "What is the tallest living land animal?",
        "The giraffe is the tallest living land animal.",
        "The giraffe",
        ["The elephant", "The ostrich", "The camel"],
    ),
    (
        "How many strings does a standard violin have?",
        "A standard violin has four strings.",
        "Four",
        ["Five", "Six", "Three"],
    ),
    (
        "Which instrument measures air pressure?",
        "A barometer measures air pressure.",
        "A barometer",
        ["A thermometer", "A hygrometer", "An anemometer"],
    ),
    (
        "Which ancient Greek poet is traditionally credited with the Odyssey?",
        "The Odyssey is traditionally credited to Homer.",
        "Homer",
        ["Virgil", "Sophocles", "Ovid"],
    ),
    ("What is the chemical formula of water?", "The chemical formula of water is H2O.", "H2O", ["CO2", "H2O2", "HO2"]),
    (
        "Which country gave the Statue of Liberty to the United States?",
        "France gave the Statue of Liberty to the United States.",
        "France",
        ["The United Kingdom", "Spain", "Italy"],
    ),
    (
        "What is the largest organ of the human body?",
        "The skin is the largest organ of the human body.",
        "The skin",
        ["The liver", "The brain", "The lungs"],
    ),
]

WRITING_LARGE = (
    [
        (f'Which word is a synonym of "{w}"?', f'"{a}" is a synonym of "{w}".', a, d)
        for w, a, d in [
            ("rapid", "Fast", ["Slow", "Loud", "Calm"]),
            ("enormous", "Huge", ["Tiny", "Narrow", "Gentle"]),
            ("begin", "Start", ["Finish", "Pause", "Delay"]),
            ("brave", "Courageous", ["Fearful", "Careless", "Shy"]),
            ("silent", "Quiet", ["Noisy", "Empty", "Dark"]),
            ("purchase", "Buy", ["Sell", "Borrow", "Lend"]),
            ("fatigued", "Exhausted", ["Energetic", "Hungry", "Anxious"]),
        ]
    ]
    + [
        (f'What is an antonym of "{w}"?', f'"{a}" is an antonym of "{w}".', a, d)
        for w, a, d in [
            ("ancient", "Modern", ["Old", "Historic", "Ruined"]),
            ("expand", "Shrink", ["Grow", "Stretch", "Widen"]),
            ("accept", "Reject", ["Receive", "Allow", "Take"]),
            ("shallow", "Deep", ["Narrow", "Thin", "Low"]),
            ("victory", "Defeat", ["Triumph", "Success", "Battle"]),
            ("scarce", "Plentiful", ["Rare", "Limited", "Scattered"]),
        ]
    ]
    + [
        (f'What is the past tense of "{w}"?', f'The past tense of "{w}" is "{a}".', a, d)
        for w, a, d in [
            ("swim", "swam", ["swimmed", "swum", "swimming"]),
            ("go", "went", ["goed", "gone", "going"]),
            ("bring", "brought", ["brang", "bringed", "brung"]),
            ("write", "wrote", ["writed", "written", "writted"]),
        ]
    ]
    + [
        (f'What is the plural of "{w}"?', f'The plural of "{w}" is "{a}".', a, d)
        for w, a, d in [
            ("mouse", "mice", ["mouses", "mices", "meese"]),
            ("tooth", "teeth", ["tooths", "teeths", "toothes"]),
            ("leaf", "leaves", ["leafs", "leafes", "leavs"]),
            ("woman", "women", ["womans", "womens", "womanes"]),
        ]
    ]
    + [
        (f'Which sentence uses "{w}" correctly?', f'"{a}" uses "{w}" correctly.', a, d)
        for w, a, d in [
            (
                "its",
                "The dog wagged its tail.",
                ["Its going to rain later.", "The cat licked it's paw.", "Its' color is blue."],
            ),
            (
                "you're",
                "You're going to love this book.",
                ["Is this you're coat?", "You're coat is on the chair.", "I like you're idea."],
            ),
            (
                "too",
                "This soup is too hot to eat.",
                ["I want to go too the park.", "She has too cats.", "We walked too the shop."],
            ),
            (
                "fewer",
                "There are fewer cars on the road today.",
                ["There is fewer water in the glass.", "I have fewer money than you.", "She drinks fewer coffee now."],
            ),
            (
                "whose",
                "Whose jacket is this?",
                ["Whose going to the party?", "I wonder whose at the door.", "Whose been eating my cake?"],
            ),
            (
                "than",
                "She is taller than her brother.",
                [
                    "First we eat, than we leave.",
                    "If you finish early, than you can go.",
                    "Back than, we had no phones.",
                ],
            ),
        ]
    ]
    + [
        (
            "Which sentence has correct subject-verb agreement?",
            '"The list of items is on the desk." has correct agreement.',
            "The list of items is on the desk.",
            ["The list of items are on the desk.", "The dogs barks at night.", "She walk to school every day."],
        ),
        (
            'Which is the correct spelling of the word meaning "to provide room for"?',
            'The correct spelling is "accommodate".',
            "accommodate",
            ["acommodate", "accomodate", "acomodate"],
        ),
        (
            "Which is the correct spelling of the second month of the year?",
            'The correct spelling is "February".',
            "February",
            ["Febuary", "Februery", "Febrary"],
        ),
    ]
)

EXTRACTION_LARGE = [
    (
        "Who won the chess tournament described in the passage?",
        "After five rounds, Priya Nair finished ahead of the defending champion, Tomas Berg, while Ada Kim placed third.",
        "Priya Nair won the tournament.",
        "Priya Nair",
        ["Tomas Berg", "Ada Kim", "The passage does not say"],
    ),
    (
        "In which year was the observatory built?",
        "The hilltop observatory, built in 1887, was restored in 1994 and reopened to visitors in 2001.",
        "The observatory was built in 1887.",
        "1887",
        ["1994", "2001", "1978"],
    ),
    (
        "What is the sentiment of this restaurant review?",
        "The soup was cold, the waiter ignored us, and the bill was wrong. Never again.",
        "The sentiment is negative.",
        "Negative",
        ["Positive", "Neutral", "Mixed"],
    ),
    (
        "In which language is this greeting written?",
        "Guten Morgen, wie geht es dir?",
        "The greeting is written in German.",
        "German",
        ["Dutch", "Swedish", "Danish"],
    ),
    (
        "Which topic does this headline belong to?",
        "Underdog striker scores twice as City reach the cup final",
        "The headline is about sports.",
        "Sports",
        ["Politics", "Business", "Science"],
    ),
    (
        "According to the notice, what time does the museum close on Saturdays?",
        "The museum opens at 10 a.m. every day. It closes at 6 p.m. on weekdays and at 8 p.m. on Saturdays and Sundays.",
        "On Saturdays the museum closes at 8 p.m.",
        "8 p.m.",
        ["6 p.m.", "10 a.m.", "10 p.m."],
    ),
    (
        "In which room is the data workshop held?",
        "The morning keynote is in Hall A. After lunch, the data workshop takes place in Room 214, and the closing panel returns to Hall A.",
        "The data workshop is held in Room 214.",
        "Room 214",
        ["Hall A", "Room 241", "Hall B"],
    ),
    (
        "What is the tracking number in this shipping notice?",
        "Your parcel has shipped. Tracking number: ZX-48213. Expected delivery: Thursday.",
        "The tracking number is ZX-48213.",
        "ZX-48213",
        ["ZX-48231", "XZ-48213", "48213"],
    ),
    (
        "What does the tenant ask the landlord to repair?",
        "Hello Mr. Grant, the heating works fine now, but the kitchen tap has been leaking since Monday. Could someone come to fix it this week?",
        "The tenant asks for the leaking kitchen tap to be repaired.",
        "The kitchen tap",
        ["The heating", "The kitchen window", "The front door"],
    ),
    (
        "How many tickets in total does this request ask for?",
        "Please reserve two adult tickets and three child tickets for the 4 p.m. show.",
        "The request asks for 5 tickets in total: two adult and three child tickets.",
        "5",
        ["2", "3", "4"],
    ),
    (
        "Who will lead the support team, according to the memo?",
        "From next month, Carlos Reyes will lead the support team, taking over from Mia Lund, who moves to the sales department.",
        "Carlos Reyes will lead the support team.",
        "Carlos Reyes",
        ["Mia Lund", "The sales manager", "Nobody is named"],
    ),
    (
        "What does the customer want help with in this message?",
        "I can't log in to my account. The reset email never arrives. Can you help me get back in?",
        "The customer wants help getting back into their account.",
        "Account access",
        ["A refund", "Shipping", "Cancelling an order"],
    ),
    (
        "Which ingredient does the recipe add last?",
        "Melt the butter, stir in the sugar, beat in the eggs, and finally fold in the flour.",
        "The flour is added last.",
        "Flour",
        ["Butter", "Sugar", "Eggs"],
    ),
    (
        "What weather does the forecast give for Wednesday?",
        "Monday will be sunny and Tuesday cloudy, and heavy rain is expected on Wednesday before it clears on Thursday.",
        "The forecast for Wednesday is heavy rain.",
        "Heavy rain",
        ["Sunshine", "Clouds", "Clear skies"],
    ),
    (
        "How far is the campsite from the trailhead?",
        "From the trailhead it is 3 km to the waterfall and another 5 km from the waterfall to the campsite.",
        "The campsite is 8 km from the trailhead.",
        "8 km",
        ["5 km", "3 km", "2 km"],
    ),
    (
        "Is this statement a fact or an opinion?",
        "Jazz is the most beautiful kind of music ever created.",
        "It is an opinion, because it is a personal judgment that cannot be proven.",
        "An opinion",
        ["A fact", "A question", "An instruction"],
    ),
    (
        "Which team won the match described here, and by what score?",
        "The home side led 2-0 at half-time, but the visitors came back to win 3-2.",
        "The visitors won 3-2.",
        "The visitors, 3-2",
        ["The home side, 2-0", "The home side, 3-2", "Nobody; it was a draw"],
    ),
]


def large_extraction(rng: random.Random) -> list[tuple]:
    out = [("extraction",) + t for t in EXTRACTION_LARGE]
    # stock lists: how many of one item
    for place, items in (
        ("corner shop", ["apples", "pears", "plums", "lemons"]),
        ("stationery cupboard", ["pens", "folders", "staplers", "rulers"]),
        ("garden shed", ["rakes", "spades", "buckets", "hoses"]),
        ("café fridge", ["juices", "yogurts", "salads", "sandwiches"]),
    ):
        counts = rng.sample(range(3, 40), 4)
        k = rng.randrange(4)
        passage = (
            f"Stock count for the {place}: "
            + ", ".join(f"{c} {it}" for c, it in zip(counts[:-1], items[:-1]))
            + f" and {counts[-1]} {items[-1]}."
        )
        ans = str(counts[k])
        out.append(
            (
                "extraction",
                f"According to the stock count, how many {items[k]} are in the {place}?",
                passage,
                f"The stock count lists {counts[k]} {items[k]}.",
                ans,
                _pick(ans, [str(c) for c in counts] + [str(counts[k] + 1), str(counts[k] + 2)]),
            )
        )
    # ages: how old is one person
    names = LARGE_NAMES[:]
    rng.shuffle(names)
    for j in range(3):
        trio = names[3 * j : 3 * j + 3]
        ages = rng.sample(range(8, 70), 3)
        passage = f"{trio[0]} is {ages[0]} years old, {trio[1]} is {ages[1]}, and {trio[2]} is {ages[2]}."
        ans = str(ages[j])
        out.append(
            (
                "extraction",
                f"How old is {trio[j]}, according to the passage?",
                passage,
                f"{trio[j]} is {ages[j]} years old.",
                ans,
                _pick(ans, [str(a) for a in ages] + [str(ages[j] + 10), str(ages[j] + 1)]),
            )
        )
    # menu prices
    menu = ["coffee", "tea", "muffin", "sandwich"]
    for j, item in enumerate(("tea", "muffin", "sandwich")):
        cents = [c * 5 for c in rng.sample(range(24, 120), 4)]
        prices = [money(Fraction(c, 100)) for c in cents]
        passage = "Today's menu: " + ", ".join(f"{m} {p}" for m, p in zip(menu, prices)) + "."
        k = menu.index(item)
        out.append(
            (
                "extraction",
                f"How much does a {item} cost on today's menu?",
                passage,
                f"A {item} costs {prices[k]} on today's menu.",
                prices[k],
                _pick(prices[k], prices + [money(Fraction(cents[k] + 50, 100))]),
            )
        )
    return out


def build_eval_large() -> list[dict]:
    """eval_heldout's items, then the new ones interleaved by category, answers placed by a fixed seed."""
    base = build_eval()
    rng = random.Random(LARGE_SEED)
    new = (
        large_reasoning(random.Random(LARGE_SEED + 1))
        + large_math(random.Random(LARGE_SEED + 2))
        + large_coding()
        + [("facts", ins, "", out, c, d) for ins, out, c, d in FACTS_LARGE]
        + [("writing", ins, "", out, c, d) for ins, out, c, d in WRITING_LARGE]
        + large_extraction(random.Random(LARGE_SEED + 3))
    )
    by_cat = {c: [t for t in new if t[0] == c] for c in CATEGORIES}
    ordered = [by_cat[c][i] for i in range(max(map(len, by_cat.values()))) for c in CATEGORIES if i < len(by_cat[c])]
    # positions for the new items so that the whole file is as even as possible over 0..3
    total = len(base) + len(ordered)
    have = Counter(r["answer_index"] for r in base)
    positions = [k for k in range(4) for _ in range(total // 4 + (k < total % 4) - have[k])]
    assert len(positions) == len(ordered), (len(positions), len(ordered))
    rng.shuffle(positions)
    items = list(base)
    for (cat, ins, inp, out, correct, distractors), k in zip(ordered, positions):
        choices = list(distractors)
        rng.shuffle(choices)
        choices.insert(k, correct)
        items.append(
            {"instruction": ins, "input": inp, "output": out, "choices": choices, "answer_index": k, "category": cat}
        )
    return items


def write(seed: list[dict], ev: list[dict], large: list[dict]) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "seed_alpaca.json").write_text(json.dumps(seed, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    for name, items in (("eval_heldout.jsonl", ev), ("eval_large.jsonl", large)):
        with open(DATA / name, "w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower())


def check_code() -> None:
    """Run every coding answer that holds code, with its test."""
    for ins, _inp, out, test in CODING:
        blocks = re.findall(r"```(\w+)\n(.*?)```", out, flags=re.S)
        if test is None:
            assert not blocks, ins
            continue
        if test.startswith("@stdout_expr "):
            code, expected = test[len("@stdout_expr ") :].split("|", 1)
            got = subprocess.run(["python3", "-c", code], capture_output=True, text=True, check=True).stdout
            assert got == expected, (ins, got)
            continue
        assert len(blocks) == 1, ins
        lang, code = blocks[0]
        if lang == "python":
            if test.startswith("@stdout "):
                got = subprocess.run(["python3", "-c", code], capture_output=True, text=True, check=True).stdout
                assert got == test[len("@stdout ") :], (ins, got)
            elif test.startswith("@file "):
                with tempfile.TemporaryDirectory() as d:
                    Path(d, test.split()[1]).write_text("first\nsecond\n")
                    got = subprocess.run(
                        ["python3", "-c", code], cwd=d, capture_output=True, text=True, check=True
                    ).stdout
                    assert got == "first\nsecond\n", (ins, got)
            else:
                ns: dict = {}
                exec(code, ns)
                exec(test, ns)
        elif lang == "sql":
            con = sqlite3.connect(":memory:")
            con.execute("CREATE TABLE users (name TEXT, age INTEGER)")
            con.executemany("INSERT INTO users VALUES (?, ?)", [("a", 25), ("b", 30), ("c", 41)])
            assert con.execute(code).fetchall() == [("c", 41)], ins
        elif lang == "bash":
            with tempfile.TemporaryDirectory() as d:
                Path(d, "log.txt").write_text("a\nb\nc\n")
                got = subprocess.run(["bash", "-c", code], cwd=d, capture_output=True, text=True, check=True).stdout
                assert got.strip() == "3", (ins, got)
        elif lang == "javascript":
            if shutil.which("node"):
                subprocess.run(["node", "-e", code + "\n" + test[len("@js ") :]], check=True)
            else:
                print("  (node not found; JavaScript answer not run)")
        else:
            raise AssertionError(f"unknown language {lang}")
        n_lines = len(code.strip().splitlines())
        assert n_lines <= 15, (ins, n_lines)
    print(f"code answers: all {len(CODING)} coding items checked")


def validate(seed_path: Path = DATA / "seed_alpaca.json", eval_path: Path = DATA / "eval_heldout.jsonl") -> dict:
    seed = json.loads(seed_path.read_text(encoding="utf-8"))
    assert isinstance(seed, list) and len(seed) >= 170, len(seed)
    seen: set[str] = set()
    for r in seed:
        assert set(r) == {"instruction", "input", "output", "category"}, r
        assert all(isinstance(r[k], str) for k in r), r
        for k in ("instruction", "output", "category"):
            assert r[k].strip(), (k, r)
        assert r["category"] in CATEGORIES, r
        assert _norm(r["instruction"]) not in seen, f"duplicate seed instruction: {r['instruction']}"
        seen.add(_norm(r["instruction"]))
        words = len(r["output"].split())
        assert words <= 150, (words, r["instruction"])
    seed_counts = Counter(r["category"] for r in seed)
    n_ext_input = sum(1 for r in seed if r["category"] == "extraction" and r["input"].strip())
    assert n_ext_input >= 25, n_ext_input

    ev = [json.loads(line) for line in eval_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(ev) >= 60, len(ev)
    ev_seen: set[str] = set()
    for r in ev:
        assert set(r) == {"instruction", "input", "output", "choices", "answer_index", "category"}, r
        for k in ("instruction", "output", "category"):
            assert isinstance(r[k], str) and r[k].strip(), (k, r)
        assert isinstance(r["input"], str)
        assert r["category"] in CATEGORIES, r
        ch = r["choices"]
        assert isinstance(ch, list) and len(ch) == 4 and all(isinstance(c, str) and c.strip() for c in ch), r
        assert len({_norm(c) for c in ch}) == 4, f"choices not distinct: {ch}"
        a = r["answer_index"]
        assert isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 3, r
        assert _norm(r["instruction"]) not in ev_seen, f"duplicate eval instruction: {r['instruction']}"
        ev_seen.add(_norm(r["instruction"]))
        assert _norm(r["instruction"]) not in seen, f"eval instruction in seed: {r['instruction']}"
        # also no eval prompt (instruction + input) equal to a seed prompt
    seed_prompts = {_norm(r["instruction"] + "\n" + r["input"]) for r in seed}
    for r in ev:
        assert _norm(r["instruction"] + "\n" + r["input"]) not in seed_prompts, r
    return {
        "seed_total": len(seed),
        "seed_by_category": dict(sorted(seed_counts.items())),
        "seed_with_input": sum(1 for r in seed if r["input"].strip()),
        "seed_extraction_with_input": n_ext_input,
        "seed_max_output_words": max(len(r["output"].split()) for r in seed),
        "eval_total": len(ev),
        "eval_by_category": dict(sorted(Counter(r["category"] for r in ev).items())),
        "eval_with_input": sum(1 for r in ev if r["input"].strip()),
        "eval_answer_index": dict(sorted(Counter(r["answer_index"] for r in ev).items())),
    }


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", s.lower())


def _ngrams(s: str, n: int = 8) -> set[tuple[str, ...]]:
    w = _words(s)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def check_large_code() -> None:
    """Run every snippet of eval_large in a fresh python3 and compare with the marked answer."""
    by_ins = {(r["instruction"], r["input"]): r for r in build_eval_large()}
    n = 0
    for i, (code, expected, _d, _why) in enumerate(LARGE_SNIPPETS):
        got = subprocess.run(["python3", "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        assert got == expected, (code, got)
        hits = [r for (ins, inp), r in by_ins.items() if inp == code or (not inp and f" {code} " in f" {ins} ")]
        assert len(hits) == 1, (code, len(hits))
        assert hits[0]["choices"][hits[0]["answer_index"]] == got, (code, hits[0])
        n += 1
    print(f"eval_large: all {n} Python snippet answers re-run and matched")


# The one eval_heldout item that shares an 8-word run with a seed instruction ("what day of the week
# will it be"). eval_heldout.jsonl is frozen and eval_large keeps its items unchanged, so it is exempt.
LARGE_NGRAM_EXEMPT = {"If today is Monday, what day of the week will it be in 9 days?"}


def validate_large(
    seed_path: Path = DATA / "seed_alpaca.json",
    heldout_path: Path = DATA / "eval_heldout.jsonl",
    large_path: Path = DATA / "eval_large.jsonl",
) -> dict:
    seed = json.loads(seed_path.read_text(encoding="utf-8"))
    heldout = [json.loads(line) for line in heldout_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ev = [json.loads(line) for line in large_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(ev) >= 220, len(ev)
    assert ev[: len(heldout)] == heldout, "eval_large must start with every eval_heldout item, unchanged"
    assert len(ev) - len(heldout) >= 154, len(ev) - len(heldout)
    seed_ins = {_norm(r["instruction"]) for r in seed}
    seed_prompts = {_norm(r["instruction"] + "\n" + r["input"]) for r in seed}
    seed_grams: set[tuple[str, ...]] = set()
    for r in seed:
        seed_grams |= _ngrams(r["instruction"]) | _ngrams(r["output"])
    seen: set[str] = set()
    for r in ev:
        assert set(r) == {"instruction", "input", "output", "choices", "answer_index", "category"}, r
        for k in ("instruction", "output", "category"):
            assert isinstance(r[k], str) and r[k].strip(), (k, r)
        assert isinstance(r["input"], str)
        assert r["category"] in CATEGORIES, r
        ch = r["choices"]
        assert isinstance(ch, list) and len(ch) == 4 and all(isinstance(c, str) and c.strip() for c in ch), r
        assert len({_norm(c) for c in ch}) == 4, f"choices not distinct: {ch}"
        a = r["answer_index"]
        assert isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 3, r
        ins = _norm(r["instruction"])
        assert ins not in seen, f"duplicate eval_large instruction: {r['instruction']}"
        seen.add(ins)
        assert ins not in seed_ins, f"eval_large instruction in seed: {r['instruction']}"
        assert _norm(r["instruction"] + "\n" + r["input"]) not in seed_prompts, r
        if r["instruction"] in LARGE_NGRAM_EXEMPT:
            assert r in heldout, r
            continue
        for field in [r["instruction"], r["input"], r["output"], *ch]:
            shared = _ngrams(field) & seed_grams
            assert not shared, f"8-word run shared with the seed: {' '.join(min(shared))!r} in {r['instruction']!r}"
        assert len(r["output"].split()) <= 60, r["output"]
    by_cat = Counter(r["category"] for r in ev)
    assert set(by_cat) == set(CATEGORIES) and min(by_cat.values()) >= 25, by_cat
    pos = Counter(r["answer_index"] for r in ev)
    assert max(pos.values()) - min(pos.values()) <= 1, pos
    return {
        "eval_large_total": len(ev),
        "eval_large_new": len(ev) - len(heldout),
        "eval_large_by_category": dict(sorted(by_cat.items())),
        "eval_large_new_by_category": dict(sorted(Counter(r["category"] for r in ev[len(heldout) :]).items())),
        "eval_large_with_input": sum(1 for r in ev if r["input"].strip()),
        "eval_large_answer_index": dict(sorted(pos.items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="run the code answers and validate the written files")
    args = ap.parse_args()
    seed, ev, large = build_seed(), build_eval(), build_eval_large()
    write(seed, ev, large)
    print(f"wrote {len(seed)} seed samples, {len(ev)} eval items and {len(large)} large-eval items to {DATA}")
    if args.check:
        check_code()
        check_large_code()
        print(json.dumps({**validate(), **validate_large()}, indent=2))


if __name__ == "__main__":
    main()
