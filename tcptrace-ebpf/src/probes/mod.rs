mod bind;
mod direct;
mod skb;
mod sock;
mod tcp;
