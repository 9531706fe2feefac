"""Saying back what a person told the bot about themselves."""

import pytest

from chatbot.recall import recall, second_person


def said(*turns):
    return [("user" if n % 2 == 0 else "bot", text) for n, text in enumerate(turns)]


@pytest.mark.parametrize(("turns", "answer"), [
    (said("hi i'm maya", "hi maya! how's your day?", "good. do you remember my name?"), "your name is Maya!"),
    (said("my name is Tom and i like chess", "nice!", "what's my name?"), "your name is Tom!"),
    (said("i have two dogs and a hamster", "a zoo!", "how many dogs do i have?"),
     "you told me you have two dogs and a hamster."),
    (said("i work as a nurse, mostly nights", "tough!", "what do i do for work?"), "you told me you work as a nurse."),
    (said("im from portugal btw", "lovely!", "where am i from?"), "you told me you're from portugal."),
    (said("i'm 16 and in year 11", "busy year!", "how old am i?"), "you told me you're 16."),
    (said("went hiking with my sister emma", "lovely!", "who did i go with?"),
     "you told me you went hiking with your sister emma."),
    # A place after a comma stays with what it places.
    (said("i live in canada, in vancouver", "gorgeous!", "about 5 years. which city do i live in?"),
     "you told me you live in canada, in vancouver."),
])
def test_a_question_about_what_the_person_said_is_answered_from_it(turns, answer):
    assert recall(turns) == answer


def test_a_name_given_to_the_bots_question_counts():
    turns = [("bot", "what's your name?"), ("user", "its leo"), ("bot", "hi leo!"), ("user", "whats my name again")]
    assert recall(turns) == "your name is Leo!"


@pytest.mark.parametrize("turns", [
    said("what should i cook for dinner"),                            # nothing said before
    said("i love pizza", "me too!", "do you like music?"),             # not about the person
    said("the weather is nice", "it is!", "what's my name?"),          # never said
    said("i'm so tired", "oh no", "what's my name?"),                   # "tired" is not a name
    said("i like cats", "cute!", "ok cool"),                           # not a question
    [("bot", "hi"), ("user", "what's my name?"), ("bot", "hm")],       # the bot has the last turn
])
def test_anything_else_is_left_to_the_other_candidates(turns):
    assert recall(turns) is None


def test_second_person_turns_a_statement_round():
    assert second_person("I'm from Porto and my dog was sick") == "you're from Porto and your dog was sick"
    assert second_person("i was there, it was fun") == "you were there, it was fun"
