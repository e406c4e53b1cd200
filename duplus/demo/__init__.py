"""The embedded demo: synthetic CT, MRI and PET cases with exact labels, generated on the user's machine.

``generate`` writes the demo datasets in their public layouts; ``abdomen`` and ``headneck`` draw the
anatomy and render each modality; ``cohort`` draws the head-and-neck
patients' records and survival; ``phantoms`` holds the shape and field primitives they share.
"""
