"""OpenAI's wire format: request bodies we execute (``bodies``), the bodies we answer with
(``results``), and the file and batch objects we return (``objects``).

Fields follow OpenAI's API reference (summed up in docs/compatibility.md). Our extensions
are marked ``# batchd extension``.
"""
