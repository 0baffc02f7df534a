"""Mirror of modules/extra_networks.py (Forge = A1111 1.10.1): the registry, ExtraNetworkParams, the tag
regex and parse_prompt, and activate() which activates every registered network ([] when not in the
prompt) and then runs the scripts' after_extra_networks_activate."""

from __future__ import annotations

import re
from collections import defaultdict

extra_network_registry = {}
extra_network_aliases = {}


# modules/extra_networks.py: register_extra_network(extra_network)
def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


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


# modules/extra_networks.py: activate(p, extra_network_data)
def activate(p, extra_network_data):
    activated = []
    for name, args in extra_network_data.items():
        network = extra_network_registry.get(name)
        if network is None:
            continue
        network.activate(p, args)
        activated.append(network)
    for network in extra_network_registry.values():
        if network not in activated:
            network.activate(p, [])
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(
            p,
            batch_number=p.iteration,
            prompts=p.prompts,
            seeds=p.seeds,
            subseeds=p.subseeds,
            extra_network_data=extra_network_data,
        )


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


# modules/extra_networks.py: parse_prompt(prompt)
def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res
