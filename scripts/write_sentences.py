"""Write the English sentences of src/earful/data/text/sentences.txt with the bundled SmolLM2.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice .venv/bin/python scripts/write_sentences.py \
        --out src/earful/data/text/sentences.txt --seed 0

SmolLM2-135M-Instruct (`bundled:smollm2-135m-instruct`, Apache-2.0) is asked, with sampling, for
a few sentences in each of several forms (plain statements, a story, a diary, things people say,
questions) about each topic below; its answers are cut into sentences and only clean ones are
kept (5-25 words of letters and plain punctuation, no list markers, no talk about the task),
each once. The topics spread the vocabulary; the model's words are its own. Every batch is
seeded (`--seed` + batch index), so a rerun on the same software writes the same file; the
committed file is the corpus, so nobody has to run this again to use it.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

TOPICS = """
a rainy morning at the harbour; baking bread at home; a lost dog in the park; the history of bicycles; learning to swim;
a busy train station; growing tomatoes in a garden; the moon and the tides; a birthday party for a grandmother;
winter in the mountains; a small town library; fixing a flat tyre; whales in the ocean; a job interview;
the first day of school; a summer thunderstorm; a fishing trip with a friend; cooking soup for a cold day;
an old clock in the hallway; a visit to the dentist; planting trees in spring; a football match in the rain;
a night sky full of stars; making pancakes for breakfast; a cat that sleeps all day; moving to a new city;
a farmer's market on Saturday; a broken washing machine; learning to play the piano; a long bus journey;
the life of honey bees; a picnic by the river; a camping trip in the forest; a hospital nurse on a night shift;
a bakery on the corner; painting a bedroom; a quiet Sunday afternoon; the smell of fresh coffee; a snowy village;
a thief who stole a bicycle; a lighthouse keeper; a wedding in the countryside; a museum of ancient history;
a volcano erupting; the desert at night; a bridge over a wide river; the invention of the telephone;
a letter from an old friend; a storm at sea; an orchestra rehearsal; a carpenter building a table;
a child learning to read; a chess tournament; riding a horse on the beach; the autumn leaves falling;
a crowded market in the city; a mountain climber; a science experiment at school; a family dinner;
a bird building a nest; a walk through the woods; the weather forecast; a power cut in the evening;
a road trip across the country; a pilot landing a plane; a new pair of shoes; an apple orchard;
a kitchen after a party; the life of a postman; a garden full of roses; a flooded street; a missing key;
a busy restaurant kitchen; the ocean waves; a firefighter at work; a river in the spring; a sleepy owl;
an elderly neighbour; a shop that sells old books; the first snow of the year; a noisy classroom;
a doctor visiting a patient; a trip to the zoo; a boat race; an island with palm trees; a castle on a hill;
the history of bread; a frog in a pond; the price of vegetables; a teacher who loves poetry;
a farmer and his cows; a group of friends playing cards; a foggy morning; a tired runner after a race;
a jar of honey; a forgotten umbrella; the colours of a rainbow; a detective solving a mystery;
a baby learning to walk; a hot day at the beach; a shepherd and his sheep; a rocket launch;
a village festival; a dusty attic; a barber shop; the wind in the trees; a cup of tea with a neighbour;
a mechanic repairing a car; a spider spinning a web; a small boat on a lake; the sound of church bells;
a lazy dog on the porch; a grocery list; a new computer; a mailbox full of letters; a waterfall;
a girl who wants to be an astronaut; a soldier coming home; a kite on a windy day; a mouse in the kitchen;
the history of writing; a garden snail; a bus driver; an old photograph; a clock tower; a cold glass of milk;
a city park in the evening; ice skating on a frozen lake; a sandwich for lunch; a river boat captain;
a song on the radio; a long queue at the post office; a king and his advisers; a tailor sewing a coat;
a mountain lake; a bee sting; a lost wallet; a train that was late; sunrise over the fields;
the job of a librarian; a street musician; a country road; a basket of apples; a warm blanket;
a penguin in the snow; a school play; the roof of a house; a carpenter's tools; a busy airport;
a small cafe; an election in a small town; a vegetable soup recipe; an old sailor's story;
a bookshop cat; a student studying for an exam; a football coach; a jungle at night; a muddy field;
a tall giraffe; a cheese shop; a village doctor; a bicycle race; a wooden boat; a museum guard;
saving money for a holiday; a night at the theatre; an old map; a brave little mouse; a heavy suitcase;
a cold winter evening by the fire; a birthday cake; a hungry bear; a hot air balloon; the stars and planets;
a clean kitchen; a gardener pulling weeds; a visit to a farm; a pet rabbit; a noisy neighbour;
a letter to a pen friend; a trip on a ferry; the history of ships; a new baby in the family;
a walk in the rain; a busy harbour; the life of ants; a quiet village church; a traffic jam;
a fox in the garden; a piece of chocolate; a pair of old boots; the smell of the sea; a radio station;
a cook who burns the dinner; a forest fire; a school bus; a singer on stage; a field of wheat;
an ice cream van; a sick child staying at home; the first car; a long winter; a lake full of fish;
a hardware store; a dog that learns a trick; the night shift at a factory; a family holiday by the sea;
the life of a tree; a coat with many pockets; a tea party; a snowman; the evening news; a tired mother;
a hiking trail; a parrot that talks; a game of hide and seek; a city at night; a bowl of rice;
a country fair; a window cleaner; the history of medicine; a lonely old man; the moon landing;
a rainy week; a swimming pool in summer; a cow in the meadow; a fresh loaf from the oven; a bright red car
"""

FORMS = (
    "Write five short, simple sentences about {topic}.",
    "Tell a very short story about {topic} in five plain sentences.",
    "Write four sentences from a diary entry about {topic}.",
    "Write four things a person might say out loud about {topic}.",
    "Write four questions someone might ask about {topic}.",
)

_LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*•]|[A-Z]:)\s*")
_CLEAN = re.compile(r"^[A-Z][A-Za-z ,.'?!-]*[.?!]$")
_META = re.compile(r"\b(sentences?|here are|sure|I hope|as an AI|diary entry|questions?:|story about)\b", re.I)
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


def clean_sentences(answer: str) -> list[str]:
    """The clean 5-25 word sentences of one answer, in order."""
    out = []
    for line in answer.splitlines():
        line = _LIST_MARK.sub("", line).strip().strip('"').strip()
        for s in _SENTENCE_END.split(line):
            s = " ".join(s.replace("\u2019", "'").split()).strip('"')
            words = s.split()
            if not 5 <= len(words) <= 25 or not _CLEAN.match(s) or _META.search(s):
                continue
            if max(words.count(w) for w in words) > 3 or "  " in s or ".." in s:
                continue
            out.append(s)
    return out


def key(sentence: str) -> str:
    return re.sub(r"[^a-z ]", "", sentence.lower())


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from earful.atomic import write_text
    from earful.pretrained import resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1, help="passes over every (topic, form) pair, each with new seeds")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--max-requests", type=int, default=None, help="stop after this many requests")
    p.add_argument("--resume", action="store_true", help="go on from the requests --out already holds (same seed and batch size)")
    args = p.parse_args()

    folder = resolve("bundled:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    topics = [t.strip() for t in TOPICS.replace("\n", " ").split(";") if t.strip()]
    requests = [form.format(topic=t) for _ in range(args.rounds) for t in topics for form in FORMS]
    random.Random(args.seed).shuffle(requests)  # any prefix of the run covers every topic and form
    requests = requests[: args.max_requests]
    seen, kept, first = set(), [], 0
    if args.resume and Path(args.out).is_file():  # go on from the requests the file says it holds
        text = Path(args.out).read_text(encoding="utf-8")
        first = int(re.search(r"from the first (\d+) of", text).group(1))
        kept = [t for t in text.splitlines() if t and not t.startswith("#")]
        seen = {key(t) for t in kept}
        if first % args.batch_size:
            raise SystemExit(f"{args.out} holds {first} requests, not a whole number of batches of {args.batch_size}")
    start = time.time()
    for b in range(first, len(requests), args.batch_size):
        chats = [tok.apply_chat_template([{"role": "user", "content": r}], tokenize=False, add_generation_prompt=True)
                 for r in requests[b : b + args.batch_size]]
        batch = tok(chats, return_tensors="pt", padding=True)
        torch.manual_seed(args.seed + b // args.batch_size)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.8, top_p=0.9,
                                 pad_token_id=tok.pad_token_id)
        for answer in tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True):
            for s in clean_sentences(answer):
                if key(s) not in seen:
                    seen.add(key(s))
                    kept.append(s)
        words = {w.strip(",.?!'").lower() for s in kept for w in s.split()}
        print(f"{b + len(chats)}/{len(requests)} requests: {len(kept)} sentences, {len(words)} distinct words, "
              f"{time.time() - start:.0f} s", flush=True)
        # Written after every batch, so a run stopped early leaves the sentences of the requests done.
        header = (
            "# English sentences written by SmolLM2-135M-Instruct (bundled:smollm2-135m-instruct, Apache-2.0),\n"
            f"# sampled (temperature 0.8, top-p 0.9, seed {args.seed}, batch {args.batch_size}) by scripts/write_sentences.py\n"
            f"# from the first {b + len(chats)} of its shuffled requests ({len(topics)} topics x {len(FORMS)} forms),\n"
            "# filtered to clean 5-25 word sentences, each once: "
            f"{len(kept)} sentences, {len(words)} distinct words.\n"
            "# Machine-written: fluent but sometimes odd or untrue; use as speech-corpus text, not as facts.\n"
        )
        write_text(args.out, header + "".join(s + "\n" for s in kept))
    print(f"wrote {args.out}: {len(kept)} sentences")


if __name__ == "__main__":
    main()
