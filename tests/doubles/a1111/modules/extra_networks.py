"""Mirror of modules/extra_networks.py (A1111 v1.10.1): the extra-network registry, tag parsing and the
activate() that ends with the scripts' after_extra_networks_activate."""

from __future__ import annotations

import re
from collections import defaultdict

from modules import errors

extra_network_registry = {}
extra_network_aliases = {}


# modules/extra_networks.py: initialize()
def initialize():
    extra_network_registry.clear()
    extra_network_aliases.clear()


# modules/extra_networks.py: register_extra_network(extra_network)
def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


# modules/extra_networks.py: register_extra_network_alias(extra_network, alias)
def register_extra_network_alias(extra_network, alias):
    extra_network_aliases[alias] = extra_network


# modules/extra_networks.py: class ExtraNetworkParams
class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}

        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


# modules/extra_networks.py: class ExtraNetwork
class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


# modules/extra_networks.py: lookup_extra_networks(extra_network_data)
def lookup_extra_networks(extra_network_data):
    res = {}
    for extra_network_name, extra_network_args in list(extra_network_data.items()):
        extra_network = extra_network_registry.get(extra_network_name)
        alias = extra_network_aliases.get(extra_network_name)
        if alias is not None and extra_network is None:
            extra_network = alias
        if extra_network is None:
            continue
        res.setdefault(extra_network, []).extend(extra_network_args)
    return res


# modules/extra_networks.py: activate(p, extra_network_data)
def activate(p, extra_network_data):
    activated = []

    for extra_network, extra_network_args in lookup_extra_networks(extra_network_data).items():
        try:
            extra_network.activate(p, extra_network_args)
            activated.append(extra_network)
        except Exception as e:
            errors.display(
                e, f"activating extra network {extra_network.name} with arguments {extra_network_args}"
            )

    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network in activated:
            continue
        try:
            extra_network.activate(p, [])
        except Exception as e:
            errors.display(e, f"activating extra network {extra_network_name}")

    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(
            p,
            batch_number=p.iteration,
            prompts=p.prompts,
            seeds=p.seeds,
            subseeds=p.subseeds,
            extra_network_data=extra_network_data,
        )


# modules/extra_networks.py: deactivate(p, extra_network_data)
def deactivate(p, extra_network_data):
    data = lookup_extra_networks(extra_network_data)
    for extra_network in data:
        try:
            extra_network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {extra_network.name}")
    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network in data:
            continue
        try:
            extra_network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating unmentioned extra network {extra_network_name}")


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


# modules/extra_networks.py: parse_prompt(prompt)
def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        name = m.group(1)
        args = m.group(2)
        res[name].append(ExtraNetworkParams(items=args.split(":")))
        return ""

    prompt = re.sub(re_extra_net, found, prompt)
    return prompt, res


# modules/extra_networks.py: parse_prompts(prompts)
def parse_prompts(prompts):
    res = []
    extra_data = None
    for prompt in prompts:
        updated_prompt, parsed_extra_data = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed_extra_data
        res.append(updated_prompt)
    return res, extra_data
