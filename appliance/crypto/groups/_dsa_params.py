"""The default FIPS 186-4 (L, N) = (2048, 256) DSA domain parameters (the :data:`DSA2048` group).

Generated once with :func:`appliance.crypto.groups.dsa.generate_domain_parameters`
(p, q by Appendix A.1.1.2 with SHA-256, g by A.2.3 with INDEX) and stored here
with the generation record, so that anyone can validate them by A.1.1.3 and
A.2.4 (:func:`~appliance.crypto.groups.dsa.validate_domain_parameters`; the
test suite does). The seeds were nothing-up-my-sleeve values: the i-th seed
tried (i = 0, 1, ...) was SHA-256(TAG || i as 4 big-endian bytes) with

    TAG = b"Proactive Security Toolkit / DSA (2048, 256) domain_parameter_seed / "

and seed i = 44 was the first whose q is prime. Nothing secret was used.
"""

P = int(
    "b90c19599e7ece30920d23466e695ace50cd84d36955b1ca6f75d57bd1690aed"
    "d92d4a7acf796696ecc318a585c36741c2abf2cbe630217ced7aed82fc6bcc63"
    "b8e9a980317f720b3aa6cf5a5eec9bff31885d5d5d4ce44c8b08876b4307be1a"
    "f05720a1610419ee8153d2e9a5fad0a4e310a37a21b56faa5314e7ee558d2355"
    "df4debd4c3a1e94f311e1dd213f90f0ef47e84a15fd3490cff38d6977d3c17ae"
    "f3ca755a2379d0ee1e02a005c8394b779126a2d022c15776f55d8ac83bb88781"
    "4b4c567aa557591c1afbb1d781f0a51d38235179319f9f518798eeb7d932aa21"
    "2426473312b07e585984319c9c642109b05f560696b79f1d65bdce405f8c393f",
    16,
)

Q = int(
    "c29fd4f3607a87f1ee7b448036a2098bb461f4f0702c5a7c3ea8e71a79bbd083",
    16,
)

G = int(
    "2c9c713a4d6d8d62f8e84014d6c883473b40bce2350e1a778ab1e10715d43a28"
    "f8e4d40e430cfbb66bd6068d27f5589c357ac2c8e89bf190ee994db94eb0eb08"
    "314781e63b8b61827d3a9c98cdbcc207b386f0ac5b9dfe133d0d0a8d00946035"
    "92dac015973c97f297c0f5a222271e4b6b7b9634075645a6ef718f3e97585d11"
    "e95d18acbc9d286c9f98b3f85f46aa158f1c9654538579fd82de3d171b2a93c4"
    "a1f39aed6604fc3af0c2e2d894640d318046cc447b7540c729e8ce639d5f155b"
    "311eef1b692beb0caab4ae68cf1ab31a754eff462d36720bf64816ac629d6c49"
    "bf46608dc7397d573c7d05673ede82fefe5b99b9000a971f67727c9ef2e46fc6",
    16,
)

DOMAIN_PARAMETER_SEED = bytes.fromhex("504fc8d9ff20aca2a7263fbf5263249f2a3eaa07aca390154703f56f168d7b11")
COUNTER = 3646
INDEX = 1
